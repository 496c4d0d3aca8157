"""Exact expected risk of the noisy quadratic model (NQM) for SGD, heavy-ball momentum, P = H^p and EMA.

Zhang et al. 2019, "Which algorithmic choices matter at which batch sizes?" (section 3 and App. B-D);
Grosse, CSC 2541 lecture 7.

The loss is L(θ) = ½ Σ_i h_i θ_i², a gradient query is g = Hθ + ε with Cov(ε) = C/B, C diagonal. Every
optimizer considered here acts on each eigen-direction independently, and in each direction it is a linear
system driven by white noise, so its second moment has a closed form.

All three optimizers reduce to one scalar object: a Lucas sequence F_t with F_0 = 0, F_1 = 1,
F_{t+1} = P F_t − Q F_{t−1} (roots r1, r2 of x² − P x + Q). Writing h̃ = h^{1−p} (preconditioned curvature),
σ² = c·h^{−2p} (per-example noise variance of the preconditioned gradient, in θ coordinates):

===========  =================  ==========  ===============  ==========================
optimizer    P                  Q           κ                ν²  (× 1/B)
===========  =================  ==========  ===============  ==========================
SGD          1 − αh̃             0           0                α²σ²
momentum β   1 − αh̃ + β         β           β                α²σ²
EMA γ        (1 − αh̃) + γ       (1 − αh̃)γ   γ(1 − αh̃)        α²σ²(1 − γ)²
===========  =================  ==========  ===============  ==========================

and then, exactly (derivation in the docstring of :func:`second_moment`),

    E[θ_out(t)²] = E[θ(0)²] · (F_{t+1} − κ F_t)²  +  (ν²/B) · Σ_{j=1..t} F_j².

For momentum the output is θ (m(0) = 0); for EMA it is the average θ̃ with θ̃(0) = θ(0). The partial sum of
squares uses the exact tail identity F_{t+k} = F_{t+1}F_k − Q F_t F_{k−1}, so no step-by-step loop is needed:
Σ_{j≤t} F_j² = s∞ − (F_{t+1}² + Q²F_t²) s∞ + 2Q F_{t+1} F_t p∞ with
s∞ = (1+Q) / ((1−Q)((1+Q)² − P²)) and p∞ = P s∞ / (1+Q) (eq. 30-31 of the paper for momentum).
The expected risk is Σ_i ½ h_i n_i E[θ_i(t)²] over bins i holding n_i eigen-directions each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lightning_sgd.nqm import _checks as check

__all__ = [
    "Spectrum",
    "make_spectrum",
    "lucas",
    "second_moment",
    "optimizer_coefficients",
    "expected_risk",
    "steady_state_risk",
    "simulate_schedule",
]


@dataclass(frozen=True)
class Spectrum:
    """A (possibly quantized) NQM: bin i holds ``n[i]`` eigen-directions of curvature ``h[i]``.

    ``c[i]`` is the per-example gradient-noise variance along those directions (Cov(ε) = C/B), ``init[i]`` the
    initial second moment E[θ_i(0)²].
    """

    h: np.ndarray  # (k,) curvature of each bin
    c: np.ndarray  # (k,) per-example gradient-noise variance of each bin
    n: np.ndarray  # (k,) number of eigen-directions in each bin
    init: np.ndarray  # (k,) E[θ(0)²] of each direction in the bin

    def __post_init__(self) -> None:
        ranges = {"h": check.POSITIVE, "c": check.NON_NEGATIVE, "n": check.POSITIVE, "init": check.NON_NEGATIVE}
        arrays = {name: check.reals(f"Spectrum.{name}", getattr(self, name), rng) for name, rng in ranges.items()}
        if any(a.ndim != 1 or a.shape != arrays["h"].shape for a in arrays.values()):
            shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
            raise ValueError(f"Spectrum: h, c, n and init must be 1-D arrays of one length, got {shapes}.")
        for name, a in arrays.items():
            object.__setattr__(self, name, a)

    @property
    def dim(self) -> int:
        return int(round(float(self.n.sum())))

    @property
    def initial_risk(self) -> float:
        return float(0.5 * np.sum(self.n * self.h * self.init))

    def scaled(self, *, noise: float = 1.0, curvature: float = 1.0) -> Spectrum:
        """The same spectrum with C multiplied by ``noise`` and H (and C with it) by ``curvature``."""
        noise = check.real("noise", noise, check.NON_NEGATIVE)
        curvature = check.real("curvature", curvature, check.POSITIVE)
        return Spectrum(self.h * curvature, self.c * noise * curvature, self.n, self.init)


def make_spectrum(
    dim: int = 10_000,
    bins: int | None = 100,
    *,
    h: np.ndarray | None = None,
    c: np.ndarray | None = None,
    init_var: float | np.ndarray = 1.0,
    decay: float = 1.0,
    noise_scale: float = 1.0,
) -> Spectrum:
    """The paper's NQM spectrum, or any other one, quantized into ``bins`` log-spaced curvature bins.

    Defaults: h_i = 1/i for i = 1..``dim`` (``decay`` gives h_i = i^-decay), C = ``noise_scale`` · H,
    θ(0) ~ N(0, ``init_var`` I), 100 bins (Zhang et al. 2019, section 3.7). Pass ``h`` (and optionally ``c``, e.g. a
    measured Hessian spectrum and gradient variances) to use your own. ``bins=None`` keeps every direction.
    Each bin's h, c and init are the means over its members, so tr(H), tr(C) and the initial risk are exact.
    """
    dim = check.integer("dim", dim)
    bins = check.optional_integer("bins", bins)
    decay = check.real("decay", decay, check.NON_NEGATIVE)
    noise_scale = check.real("noise_scale", noise_scale, check.NON_NEGATIVE)
    if h is None:
        h = np.arange(1, dim + 1, dtype=float) ** (-decay)
    else:
        try:
            h = check.reals("h", h).ravel()
        except ValueError as err:
            raise ValueError(f"{err} Curvatures must be positive: drop the null space, it never moves.") from None
    c = noise_scale * h if c is None else _per_direction("c", c, h.shape, check.NON_NEGATIVE)
    init = _per_direction("init_var", init_var, h.shape, check.NON_NEGATIVE)
    if bins is None or bins >= h.size:
        return Spectrum(h.copy(), c.copy(), np.ones_like(h), init.copy())
    logh = np.log(h)
    lo, hi = logh.min(), logh.max()
    edges = np.linspace(lo, hi, bins + 1)
    idx = np.clip(np.searchsorted(edges, logh, side="right") - 1, 0, bins - 1)
    n = np.bincount(idx, minlength=bins).astype(float)
    keep = n > 0

    def mean(x: np.ndarray) -> np.ndarray:
        return (np.bincount(idx, weights=x, minlength=bins)[keep]) / n[keep]

    return Spectrum(mean(h), mean(c), n[keep], mean(init))


def _per_direction(name: str, value: Any, shape: tuple, rng: check.Range) -> np.ndarray:
    """A scalar or per-direction array broadcast to the spectrum's ``shape``."""
    arr = check.reals(name, value, rng)
    try:
        return np.broadcast_to(arr, shape).ravel()
    except ValueError:
        raise ValueError(f"{name} has shape {arr.shape}: give a scalar or one value per direction {shape}.") from None


def _check_spectrum(spec: Spectrum) -> None:
    if not isinstance(spec, Spectrum):
        raise TypeError(f"spec must be a Spectrum (see make_spectrum), got {type(spec).__name__}.")


def _check_constant_lr(spec: Spectrum, lr: ArrayLike, batch_size: ArrayLike, precondition_power: float,
                       momentum: ArrayLike | None, ema: ArrayLike | None) -> None:
    """Arguments of the constant-learning-rate closed forms."""
    _check_spectrum(spec)
    check.reals("lr", lr, check.POSITIVE)
    check.reals("batch_size", batch_size, check.POSITIVE)
    check.power(precondition_power)
    check.momentum_ema(momentum, ema)


def _int_power_sign(sign: np.ndarray, t: np.ndarray) -> np.ndarray:
    """sign**t for sign in {−1, +1} and integer t (as floats)."""
    odd = np.mod(t, 2.0) == 1.0
    return np.where((sign < 0) & odd, -1.0, 1.0)


def lucas(P: np.ndarray, Q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """F_t of the Lucas sequence F_0 = 0, F_1 = 1, F_{t+1} = P F_t − Q F_{t−1}, for integer t ≥ 0, broadcast.

    Closed form through the roots of x² − Px + Q, written so that nearly equal roots (critical damping) stay
    accurate: F_t = sgn^{t−1} r1^{t−1} (1 − x^t)/(1 − x) with x = r2/r1 for real roots, and
    F_t = sgn^{t−1} ρ^{t−1} sin(tψ)/sin ψ (through sinc) for complex ones.
    """
    P, Q, t = np.broadcast_arrays(np.asarray(P, float), np.asarray(Q, float), np.asarray(t, float))
    sgn = np.where(P < 0, -1.0, 1.0)
    Pa = np.abs(P)
    disc = Pa * Pa - 4.0 * Q
    tm1 = np.maximum(t - 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        # real roots: r1 = (|P| + sqrt(disc))/2 ≥ |r2|, w = 1 − r2/r1 = sqrt(disc)/r1
        sq = np.sqrt(np.maximum(disc, 0.0))
        r1 = 0.5 * (Pa + sq)
        w = np.where(r1 > 0, sq / np.where(r1 > 0, r1, 1.0), 1.0)
        x = 1.0 - w
        near = x > 0.5  # x^t close to 1: use expm1/log1p so (1 − x^t)/w stays accurate as w → 0
        g_near = np.where(w > 0, -np.expm1(t * np.log1p(-np.where(near, w, 0.5))) / np.where(w > 0, w, 1.0), t)
        xt = _int_power_sign(np.sign(x), t) * np.abs(x) ** t
        g_far = (1.0 - xt) / np.where(w > 0, w, 1.0)
        g = np.where(near, g_near, g_far)
        f_real = np.where(r1 > 0, np.exp(tm1 * np.log(np.where(r1 > 0, r1, 1.0))), (t <= 1.0).astype(float)) * g
        # complex roots (disc < 0, so Q > 0): modulus ρ = sqrt(Q), angle ψ ∈ (0, π/2]
        rho = np.sqrt(np.maximum(Q, 1e-300))
        psi = np.arccos(np.clip(Pa / (2.0 * rho), -1.0, 1.0))
        ratio = t * np.sinc(t * psi / np.pi) / np.sinc(psi / np.pi)
        f_cplx = np.exp(tm1 * np.log(rho)) * ratio
        f = np.where(disc >= 0, f_real, f_cplx)
    f = _int_power_sign(sgn, tm1) * f
    return np.where(t == 0, 0.0, f)


def optimizer_coefficients(
    lr: np.ndarray,
    h_tilde: np.ndarray,
    *,
    momentum: np.ndarray | float | None = None,
    ema: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(P, Q, κ, ν²/(α²σ²)) of the table in the module docstring, broadcast over lr, h̃ and β or γ."""
    a = 1.0 - lr * h_tilde
    if momentum is not None and ema is not None:
        raise ValueError("momentum and ema together are not modelled; pick one")
    if momentum is not None:
        beta = np.asarray(momentum, float)
        return a + beta, beta + 0.0 * a, beta + 0.0 * a, np.ones_like(a + beta)
    if ema is not None:
        gamma = np.asarray(ema, float)
        return a + gamma, a * gamma, a * gamma, (1.0 - gamma) ** 2 + 0.0 * a
    return a, np.zeros_like(a), np.zeros_like(a), np.ones_like(a)


def _sum_constants(P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s∞, p∞, stable) with s∞ = Σ_{k≥1} F_k², p∞ = Σ_{k≥1} F_k F_{k−1}; ``stable`` = both roots inside |z|<1."""
    stable = (np.abs(Q) < 1.0) & (np.abs(P) < 1.0 + Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_inf = (1.0 + Q) / ((1.0 - Q) * ((1.0 + Q) ** 2 - P * P))
        p_inf = P * s_inf / (1.0 + Q)
    return np.where(stable, s_inf, np.inf), np.where(stable, p_inf, np.inf), stable


def second_moment(P: ArrayLike, Q: ArrayLike, kappa: ArrayLike, t: ArrayLike, init: ArrayLike,
                  noise: ArrayLike) -> np.ndarray:
    """E[θ_out(t)²] = init·(F_{t+1} − κF_t)² + noise·Σ_{j=1..t} F_j², all arguments broadcast.

    Derivation: the output is linear in (θ(0), ε_0..ε_{t−1}). Its response to θ(0) solves the order-2
    recurrence with D_0 = 1, D_1 = P − κ, i.e. D_t = F_{t+1} − κF_t; its response to ε_k (entering at step
    k+1) is ∝ F_{t−k} (the impulse response starts at F_1 = 1, scaled into ``noise``). The noise is white and
    independent of θ(0), so the second moments add. Unstable configurations (a root with |r| ≥ 1) give inf.
    """
    t = np.asarray(t, float)
    f_t = lucas(P, Q, t)
    f_t1 = lucas(P, Q, t + 1.0)
    s_inf, p_inf, stable = _sum_constants(P, Q)
    with np.errstate(invalid="ignore", over="ignore"):
        tail = (f_t1 * f_t1 + Q * Q * f_t * f_t) * s_inf - 2.0 * Q * f_t1 * f_t * p_inf
        partial = np.where(stable, s_inf - tail, np.inf)
        det = f_t1 - kappa * f_t
        out = init * det * det + noise * partial
    return np.where(stable, out, np.inf)


def _direction_terms(spec: Spectrum, power: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h̃, σ², weight) per bin: preconditioned curvature, per-example noise variance in θ coords, ½ h n."""
    h_tilde = spec.h ** (1.0 - power)
    sigma2 = spec.c * spec.h ** (-2.0 * power)
    return h_tilde, sigma2, 0.5 * spec.h * spec.n


def expected_risk(
    spec: Spectrum,
    lr: ArrayLike,
    batch_size: ArrayLike,
    steps: ArrayLike,
    *,
    precondition_power: float = 0.0,
    momentum: ArrayLike | None = None,
    ema: ArrayLike | None = None,
) -> np.ndarray:
    """Exact E[L(θ_out(t))] at constant learning rate; lr, batch_size, steps, momentum/ema broadcast together."""
    _check_constant_lr(spec, lr, batch_size, precondition_power, momentum, ema)
    check.whole("steps", steps)
    h_tilde, sigma2, weight = _direction_terms(spec, precondition_power)
    lr = np.asarray(lr, float)[..., None]
    bs = np.asarray(batch_size, float)[..., None]
    t = np.asarray(steps, float)[..., None]
    mom = None if momentum is None else np.asarray(momentum, float)[..., None]
    avg = None if ema is None else np.asarray(ema, float)[..., None]
    P, Q, kappa, nu = optimizer_coefficients(lr, h_tilde, momentum=mom, ema=avg)
    m2 = second_moment(P, Q, kappa, t, spec.init, nu * lr * lr * sigma2 / bs)
    return np.sum(weight * m2, axis=-1)


def steady_state_risk(spec: Spectrum, lr: ArrayLike, batch_size: ArrayLike, *, precondition_power: float = 0.0,
                      momentum: ArrayLike | None = None, ema: ArrayLike | None = None) -> np.ndarray:
    """lim_{t→∞} of :func:`expected_risk` (inf when unstable)."""
    _check_constant_lr(spec, lr, batch_size, precondition_power, momentum, ema)
    h_tilde, sigma2, weight = _direction_terms(spec, precondition_power)
    lr = np.asarray(lr, float)[..., None]
    bs = np.asarray(batch_size, float)[..., None]
    mom = None if momentum is None else np.asarray(momentum, float)[..., None]
    avg = None if ema is None else np.asarray(ema, float)[..., None]
    P, Q, _, nu = optimizer_coefficients(lr, h_tilde, momentum=mom, ema=avg)
    s_inf, _, stable = _sum_constants(P, Q)
    with np.errstate(invalid="ignore"):
        out = np.sum(weight * np.where(stable, nu * lr * lr * sigma2 / bs * s_inf, np.inf), axis=-1)
    return out


def _per_step_batch_size(batch_size: ArrayLike, T: int) -> np.ndarray:
    bs = check.reals("batch_size", batch_size, check.POSITIVE)
    if bs.ndim > 1 or bs.size not in (1, T):
        raise ValueError(f"batch_size must be a scalar or one value per step ({T}), got shape {bs.shape}.")
    return np.broadcast_to(bs.reshape(-1), (T,))


def simulate_schedule(
    spec: Spectrum,
    lrs: ArrayLike,
    batch_size: ArrayLike,
    *,
    precondition_power: float = 0.0,
    momentum: float | None = None,
    ema: float | None = None,
) -> np.ndarray:
    """Exact expected risk after each step of a per-step learning-rate array (dynamic programming on eq. 3).

    ``lrs`` has shape (T,) or (..., T) (a batch of schedules); ``batch_size`` may be a scalar or per-step (T,)
    array. Returns the risk at t = 0..T, shape (..., T+1). The state is the 2×2 second-moment matrix of
    (θ, m) for momentum (App. B, eq. 21) or (θ, θ̃) for EMA (App. D, eq. 38), a scalar for SGD. A step with
    learning rate 0 does not move θ (the schedule's entries are ≥ 0; momentum and EMA are scalars here).
    """
    _check_spectrum(spec)
    lrs = check.reals("lrs", lrs, check.NON_NEGATIVE, scalar_ok=False)
    check.power(precondition_power)
    check.momentum_ema(momentum, ema, scalar=True)
    T = lrs.shape[-1]
    bs = _per_step_batch_size(batch_size, T)
    h_tilde, sigma2, weight = _direction_terms(spec, precondition_power)
    shape = lrs.shape[:-1] + h_tilde.shape
    # second moments of (x, y): xx, yy, xy; x = θ, y = m (momentum) or θ̃ (EMA)
    xx = np.broadcast_to(spec.init, shape).copy()
    if momentum is not None:
        yy, xy = np.zeros(shape), np.zeros(shape)
    elif ema is not None:
        yy, xy = xx.copy(), xx.copy()
    else:
        yy = xy = None
    out = np.empty(lrs.shape[:-1] + (T + 1,))
    out[..., 0] = np.sum(weight * xx, axis=-1)
    for k in range(T):
        lr = lrs[..., k, None]
        noise = sigma2 / bs[k]
        a = 1.0 - lr * h_tilde
        if momentum is not None:
            b = momentum
            # m' = b m + h̃ θ + σε ;  θ' = θ − lr m' = a θ − lr b m − lr σε
            nxx = a * a * xx + (lr * b) ** 2 * yy - 2 * a * lr * b * xy + lr * lr * noise
            nyy = h_tilde * h_tilde * xx + b * b * yy + 2 * h_tilde * b * xy + noise
            nxy = a * h_tilde * xx - lr * b * b * yy + (a * b - lr * b * h_tilde) * xy - lr * noise
            xx, yy, xy = nxx, nyy, nxy
            out[..., k + 1] = np.sum(weight * xx, axis=-1)
        elif ema is not None:
            g = ema
            # θ' = a θ + n ;  θ̃' = g θ̃ + (1 − g) θ'
            nxx = a * a * xx + lr * lr * noise
            nxy = g * (a * xy) + (1 - g) * nxx
            nyy = g * g * yy + 2 * g * (1 - g) * (a * xy) + (1 - g) ** 2 * nxx
            xx, yy, xy = nxx, nyy, nxy
            out[..., k + 1] = np.sum(weight * yy, axis=-1)
        else:
            xx = a * a * xx + lr * lr * noise
            out[..., k + 1] = np.sum(weight * xx, axis=-1)
    return out
