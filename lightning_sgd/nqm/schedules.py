"""Learning-rate schedules for the NQM and the optimized piecewise-constant schedule (Zhang et al. 2019, Fig. 3b/3c).

Schedules are plain per-step arrays, so :func:`lightning_sgd.nqm.risk` (dynamic programming on eq. 3) takes any
of them. :func:`optimize_piecewise_constant` reproduces the paper's footnote 3: for a fixed number of steps the
exact risk of a 50-piece schedule is minimised with (L-)BFGS under α ≤ 2/h̃₁, and the number of steps is found
by binary search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.core import Spectrum, _check_spectrum, _direction_terms
from lightning_sgd.nqm.search import check_target

__all__ = [
    "constant",
    "piecewise_constant",
    "linear_decay",
    "piece_lengths",
    "piecewise_risk",
    "PiecewiseResult",
    "optimize_piecewise_constant",
]


def constant(lr: float, steps: int) -> np.ndarray:
    """``steps`` steps at learning rate ``lr`` (> 0)."""
    return np.full(check.integer("steps", steps), check.real("lr", lr))


def piece_lengths(total_steps: int, pieces: int) -> np.ndarray:
    """Integer lengths of ``pieces`` near-equal consecutive pieces covering ``total_steps`` steps (some are 0 when
    there are more pieces than steps)."""
    return _piece_lengths(check.integer("total_steps", total_steps), check.integer("pieces", pieces))


def _piece_lengths(total_steps: int, pieces: int) -> np.ndarray:
    edges = np.floor(np.arange(pieces + 1) * total_steps / pieces).astype(np.int64)
    return np.diff(edges)


def piecewise_constant(values: ArrayLike, total_steps: int) -> np.ndarray:
    """Per-step array holding ``values[k]`` (learning rates > 0) on the k-th of len(values) near-equal pieces."""
    values = check.reals("values", values).ravel()
    return np.repeat(values, piece_lengths(total_steps, values.size))


def linear_decay(lr0: float, total_steps: int, *, decay: float = 0.01, decay_steps: int | None = None) -> np.ndarray:
    """Linear decay of Zhang et al. 2019, App. F.3: α(t) = α₀(1 − (1 − γ) t/T) for t ≤ T, then α₀γ
    (γ = ``decay`` ∈ [0, 1], T = ``decay_steps``, default ``total_steps``)."""
    lr0 = check.real("lr0", lr0)
    total_steps = check.integer("total_steps", total_steps)
    decay = check.real("decay", decay, check.UNIT)
    T = check.optional_integer("decay_steps", decay_steps) or total_steps
    t = np.arange(int(total_steps), dtype=float)
    return lr0 * np.where(t <= T, 1.0 - (1.0 - decay) * t / T, decay)


def piecewise_risk(spec: Spectrum, lrs: ArrayLike, total_steps: int, batch_size: float, *,
                   precondition_power: float = 0.0) -> float:
    """Exact SGD risk after ``total_steps`` steps of the piecewise-constant schedule with piece values ``lrs``."""
    _check_spectrum(spec)
    lrs = check.reals("lrs", lrs).ravel()
    batch_size = check.real("batch_size", batch_size)
    h_tilde, sigma2, weight = _direction_terms(spec, check.power(precondition_power))
    lengths = piece_lengths(total_steps, lrs.size).astype(float)
    log_r, _ = _log_risk_and_grad(np.log(lrs), lengths, h_tilde, sigma2, weight, spec.init, batch_size)
    return float(np.exp(log_r))


@dataclass
class PiecewiseResult:
    batch_size: float
    steps: int  # fewest steps found for which an optimized schedule reaches the target
    lrs: np.ndarray  # (pieces,) the optimized schedule at that number of steps
    risk: float  # its final risk (≤ target)


def _log_risk_and_grad(x: np.ndarray, lengths: ArrayLike, h_tilde: np.ndarray, sigma2: np.ndarray, weight: np.ndarray,
                       init: ArrayLike, bs: np.ndarray) -> tuple[float, np.ndarray]:
    """log of the exact piecewise SGD risk and its gradient w.r.t. x = log α (numpy, pieces × bins).

    With ℓ_k = L_k log a_k², A_k = e^{ℓ_k}, ss_k the steady state of piece k and after_k = Σ_{j>k} ℓ_j:
    v = init·e^{Σℓ} + Σ_k ss_k (1 − A_k) e^{after_k}, and ℓ_k enters e^{Σℓ}, A_k and every after_j, j < k.
    """
    lr = np.exp(x)[:, None]  # (K, 1)
    a = 1.0 - lr * h_tilde  # (K, k)
    a2 = a * a + 1e-300
    ell = lengths[:, None] * np.log(a2)
    A = np.exp(ell)
    denom = 2.0 - lr * h_tilde
    ss = lr * sigma2 / (bs * h_tilde * denom)
    suffix = np.cumsum(ell[::-1], axis=0)[::-1]  # Σ_{j≥k}
    after = np.vstack([suffix[1:], np.zeros_like(suffix[:1])])
    e_after = np.exp(after)
    contrib = ss * (-np.expm1(ell)) * e_after  # (K, k)
    v = init * np.exp(suffix[0]) + contrib.sum(0)
    R = float(np.sum(weight * v))
    prefix = np.vstack([np.zeros_like(contrib[:1]), np.cumsum(contrib, axis=0)[:-1]])  # Σ_{j<k}
    dv_dell = init * np.exp(suffix[0]) - ss * A * e_after + prefix
    dell_dlr = -2.0 * lengths[:, None] * h_tilde * a / a2
    dss_dlr = 2.0 * sigma2 / (bs * h_tilde * denom * denom)
    dv_dlr = dv_dell * dell_dlr + dss_dlr * (-np.expm1(ell)) * e_after
    grad = lr[:, 0] * np.sum(weight * dv_dlr, axis=1) / R
    return np.log(R), grad


def _optimize_fixed_T(spec: Spectrum, T: int, bs: np.ndarray, pieces: ArrayLike, power: float, x0: np.ndarray,
                      max_lr: float) -> tuple[float, np.ndarray]:
    h_tilde, sigma2, weight = _direction_terms(spec, power)
    lengths = _piece_lengths(T, pieces).astype(float)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        return _log_risk_and_grad(x, lengths, h_tilde, sigma2, weight, spec.init, float(bs))

    upper = np.log(max_lr)
    bounds = [(upper - 40.0, upper)] * pieces
    res = minimize(fun, np.clip(x0, upper - 40.0, upper), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 300, "ftol": 1e-10, "gtol": 1e-7})
    return float(np.exp(res.fun)), res.x


def optimize_piecewise_constant(
    spec: Spectrum,
    batch_size: float,
    *,
    target: float = 0.01,
    pieces: int = 50,
    precondition_power: float = 0.0,
    lo: int = 1,
    hi: int | None = None,
    init_lr: float | None = None,
    rtol: float = 0.01,
) -> PiecewiseResult:
    """Fewest steps for which some ``pieces``-piece schedule (α ≤ 2/h̃₁) reaches ``target``, and that schedule.

    Binary search on the number of steps between ``lo`` (e.g. :func:`~lightning_sgd.nqm.lower_bound_steps`)
    and ``hi`` (e.g. the best constant-LR steps, always feasible: a constant schedule is piecewise constant),
    to relative precision ``rtol`` (0 = exact integer). Each probe minimises the log of the exact risk with
    L-BFGS-B, warm-started from the previous schedule. ``lo`` ≥ 1, ``hi`` ≥ ``lo``, ``init_lr`` > 0,
    ``rtol`` ∈ [0, 1).
    """
    _check_spectrum(spec)
    batch_size = check.real("batch_size", batch_size)
    check_target(spec, target)
    pieces = check.integer("pieces", pieces)
    check.power(precondition_power)
    lo = check.integer("lo", lo)
    if hi is not None and check.integer("hi", hi) < lo:
        raise ValueError(f"hi must be >= lo ({lo}), got {hi!r}.")
    if init_lr is not None:
        check.real("init_lr", init_lr)
    rtol = check.real("rtol", rtol, check.UNIT_OPEN)
    h_tilde = spec.h ** (1.0 - precondition_power)
    max_lr = 2.0 / h_tilde.max() * (1.0 - 1e-9)
    if init_lr is None:
        init_lr = 0.5 / h_tilde.max()
    x = np.full(pieces, np.log(init_lr))
    if hi is None:
        hi = max(2 * lo, 2)
        while True:
            r, x_hi = _optimize_fixed_T(spec, hi, batch_size, pieces, precondition_power, x, max_lr)
            if r <= target:
                break
            lo, hi, x = hi, hi * 2, x_hi
    r_hi, x_hi = _optimize_fixed_T(spec, int(hi), batch_size, pieces, precondition_power, x, max_lr)
    if r_hi > target:
        raise RuntimeError(f"no schedule of {hi} steps reaches {target} (risk {r_hi:.3g}): raise hi")
    lo = max(int(lo) - 1, 0)  # lo itself may be feasible
    hi = int(hi)
    x = x_hi
    while hi - lo > max(1, int(rtol * hi)):
        mid = (lo + hi) // 2
        r, xm = _optimize_fixed_T(spec, mid, batch_size, pieces, precondition_power, x, max_lr)
        if r <= target:
            hi, r_hi, x_hi, x = mid, r, xm, xm
        else:
            lo = mid
    return PiecewiseResult(float(batch_size), hi, np.exp(x_hi), r_hi)
