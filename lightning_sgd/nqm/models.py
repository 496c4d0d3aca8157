"""The two stochastic-optimization models of Grosse's CSC 2541 lecture 7, behind one interface.

- :class:`NQM` (online learning / noisy quadratic): gradient noise independent of θ, so a fixed learning rate
  has a noise floor and the best possible risk decays like d/2N (Zhang et al. 2019, section 3).
- :class:`InterpolationModel` (stochastic linear regression with clean labels, the lecture's "Stochastic Linear
  Regression"): the noise comes only from which examples are in the batch, vanishes at the optimum, and SGD
  converges exponentially at a fixed learning rate (randomized Kaczmarz; Ma et al. 2018).

Both expose ``risk(lr, batch_size, steps, ...)``, ``steps_grid(batch_sizes, lrs, aux, kind=...)`` and
``spectrum``, so :func:`lightning_sgd.nqm.steps_to_target` can drive either.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.core import (
    Spectrum,
    _check_spectrum,
    _per_step_batch_size,
    expected_risk,
    make_spectrum,
    simulate_schedule,
    steady_state_risk,
)
from lightning_sgd.nqm.search import T_MAX, GridResult, check_target, grid_steps

__all__ = ["NQM", "InterpolationModel"]


def _check_lr(lr: ArrayLike, steps: ArrayLike) -> np.ndarray:
    """A constant learning rate (> 0, with ``steps``) or a per-step schedule (entries ≥ 0, without)."""
    if steps is None:
        lrs = check.reals("lr", lr, check.NON_NEGATIVE)
        if lrs.ndim == 0:
            raise ValueError("give steps for a constant learning rate, or pass a per-step learning-rate array")
        return lrs
    check.whole("steps", steps)
    return check.reals("lr", lr, check.POSITIVE)


def _check_search(spec: Spectrum, batch_sizes: ArrayLike, lrs: ArrayLike, precondition_power: float,
                  target: float) -> None:
    check.reals("batch_sizes", batch_sizes, check.POSITIVE)
    check.reals("lrs", lrs, check.POSITIVE)
    check.power(precondition_power)
    check_target(spec, target)


def _build_spectrum(spectrum: Spectrum | None, dim: int, bins: int | None, **kwargs: Any) -> Spectrum:
    if spectrum is None:
        return make_spectrum(dim, bins, **kwargs)
    _check_spectrum(spectrum)
    check.integer("dim", dim)
    check.optional_integer("bins", bins)
    return spectrum


def _eigh(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched symmetric eigen-decomposition with BLAS on one thread (many small matrices: threads only thrash)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn / scipy stacks
        return np.linalg.eigh(M)
    with threadpool_limits(1):
        return np.linalg.eigh(M)


class NQM:
    """Noisy quadratic model with diagonal H and C (defaults: the paper's h_i = 1/i, C = H, d = 10⁴, 100 bins).

    Args:
        dim: number of eigen-directions d.
        bins: quantize the spectrum into this many log-spaced bins (None: exact, one bin per direction).
        h, c: your own curvatures (length d) and per-example gradient-noise variances (default c = h).
        init_var: E[θ_i(0)²] (scalar or per direction).
        noise_scale: C = noise_scale · H when ``c`` is not given (equivalent to dividing B by it).
        decay: h_i = i^-decay when ``h`` is not given.
        spectrum: an already built :class:`~lightning_sgd.nqm.core.Spectrum` (overrides the rest).
    """

    name = "nqm"

    def __init__(self, dim: int = 10_000, bins: int | None = 100, *, h: ArrayLike = None, c: np.ndarray = None,
                 init_var: ArrayLike = 1.0,
                 noise_scale: float = 1.0, decay: float = 1.0, spectrum: Spectrum | None = None) -> None:
        self.spectrum = _build_spectrum(spectrum, dim, bins, h=h, c=c, init_var=init_var, decay=decay,
                                        noise_scale=noise_scale)

    @property
    def dim(self) -> int:
        return self.spectrum.dim

    def max_curvature(self, precondition_power: float = 0.0) -> float:
        return float(np.max(self.spectrum.h ** (1.0 - check.power(precondition_power))))

    def risk(self, lr: ArrayLike, batch_size: ArrayLike, steps: ArrayLike = None, *, precondition_power: float = 0.0,
             momentum: ArrayLike | None = None, ema: ArrayLike | None = None) -> np.ndarray:
        """Expected risk: closed form at ``steps`` for a constant ``lr``, or the trajectory of a per-step array."""
        lr_arr = _check_lr(lr, steps)
        if steps is None:
            return simulate_schedule(self.spectrum, lr_arr, batch_size, precondition_power=precondition_power,
                                     momentum=momentum, ema=ema)
        return expected_risk(self.spectrum, lr_arr, batch_size, steps, precondition_power=precondition_power,
                             momentum=momentum, ema=ema)

    def steady_state_risk(self, lr: ArrayLike, batch_size: ArrayLike, *, precondition_power: float = 0.0,
                          momentum: ArrayLike | None = None, ema: ArrayLike | None = None) -> np.ndarray:
        return steady_state_risk(self.spectrum, lr, batch_size, precondition_power=precondition_power,
                                 momentum=momentum, ema=ema)

    def steps_grid(self, batch_sizes: ArrayLike, lrs: ArrayLike, aux: ArrayLike = None, *, kind: str = "sgd",
                   precondition_power: float = 0.0, target: float = 0.01,
                   exhaustive: bool = False, effective_lr: bool = False, **search: Any) -> GridResult:
        """See :func:`lightning_sgd.nqm.search.grid_steps` (``search``: coarse, per_octave, n_centres)."""
        return grid_steps(self.spectrum, batch_sizes, lrs, aux, kind=kind, power=precondition_power, target=target,
                          exhaustive=exhaustive, effective_lr=effective_lr, **search)


class InterpolationModel:
    """Stochastic linear regression y = w*ᵀx (+ optional label noise), x ~ N(0, diag(h)), squared loss ½(wᵀx − y)².

    With d = w − w* and Ĥ the batch mean of x xᵀ, one SGD step (optionally preconditioned by P = H^p) is
    d ← d − α P⁻¹(Ĥ d − x̄ε). For Gaussian x, E[x xᵀ D x xᵀ] = 2HDH + tr(HD)H, so the diagonal second moments
    q_i = E[d_i²] follow the exact linear recursion

        q_i ← (1 − αh̃_i)² q_i + (α²/B) h_i^{−2p} (h_i² q_i + h_i Σ_j n_j h_j q_j) + α² σ² h_i^{1−2p} / B,

    coupled through the risk Σ_j n_j h_j q_j = 2·risk (the gradient noise shrinks with the risk: with σ = 0 it
    vanishes at the optimum and convergence is exponential). Solved through the eigen-decomposition of the
    symmetrised (diagonal + rank-one) transition matrix. Momentum and EMA are not modelled here.
    """

    name = "interpolation"

    def __init__(self, dim: int = 10_000, bins: int | None = 100, *, h: ArrayLike = None, init_var: ArrayLike = 1.0,
                 label_noise: float = 0.0,
                 decay: float = 1.0, spectrum: Spectrum | None = None) -> None:
        self.spectrum = _build_spectrum(spectrum, dim, bins, h=h, init_var=init_var, decay=decay)
        self.label_noise = check.real("label_noise", label_noise, check.NON_NEGATIVE)

    @property
    def dim(self) -> int:
        return self.spectrum.dim

    def max_curvature(self, precondition_power: float = 0.0) -> float:
        return float(np.max(self.spectrum.h ** (1.0 - check.power(precondition_power))))

    def _check(self, momentum: ArrayLike | None, ema: ArrayLike | None, precondition_power: float) -> None:
        if momentum is not None or ema is not None:
            raise NotImplementedError("InterpolationModel models plain (preconditioned) SGD only: momentum and ema "
                                      "must be None (use model='nqm' for them)")
        check.power(precondition_power)

    def _decompose(self, lr: ArrayLike, batch_size: ArrayLike, power: float) -> tuple[np.ndarray, np.ndarray,
                   np.ndarray, np.ndarray]:
        """Eigen-decomposition of the symmetrised transition; returns (λ, coef, floor) for risk(t)."""
        s = self.spectrum
        lr = np.asarray(lr, float)[..., None]
        bs = np.asarray(batch_size, float)[..., None]
        a = s.h ** (1.0 - 2.0 * power)  # (k,) noise enters direction i as a_i · Σ_j b_j q_j
        b = s.n * s.h
        h_tilde = s.h ** (1.0 - power)
        u = (1.0 - lr * h_tilde) ** 2 + lr * lr / bs * s.h ** (2.0 - 2.0 * power)  # (..., k)
        kk = lr * lr / bs  # (..., 1)
        v = np.sqrt(a * b)  # symmetrised rank-one vector; risk = ½ vᵀ q̂ with q̂_i = sqrt(b_i/a_i) q_i
        scale = np.sqrt(b / a)
        M = u[..., :, None] * np.eye(u.shape[-1]) + kk[..., None] * v[:, None] * v[None, :]
        lam, V = _eigh(M)  # (..., k), (..., k, k)
        q0 = scale * s.init
        c_noise = self.label_noise * lr * lr / bs * a * scale  # constant forcing in q̂ coordinates
        stable = np.all(np.abs(lam) < 1.0, axis=-1)
        # fixed point q̂∞ = (I − M)⁻¹ c
        with np.errstate(divide="ignore", invalid="ignore"):
            proj_c = np.einsum("...ki,...k->...i", V, np.broadcast_to(c_noise, u.shape))
            q_inf = np.einsum("...ik,...k->...i", V, proj_c / (1.0 - lam))
        proj_0 = np.einsum("...ki,...k->...i", V, q0 - q_inf)
        w = np.einsum("k,...ki->...i", v, V)
        coef = 0.5 * w * proj_0
        floor = 0.5 * np.einsum("k,...k->...", v, q_inf)
        return lam, coef, np.where(stable, floor, np.inf), stable

    def risk(self, lr: ArrayLike, batch_size: ArrayLike, steps: ArrayLike = None, *, precondition_power: float = 0.0,
             momentum: ArrayLike | None = None, ema: ArrayLike | None = None) -> np.ndarray:
        self._check(momentum, ema, precondition_power)
        lr_arr = _check_lr(lr, steps)
        if steps is None:
            return self._simulate(lr_arr, _per_step_batch_size(batch_size, lr_arr.shape[-1]), precondition_power)
        check.reals("batch_size", batch_size, check.POSITIVE)
        lam, coef, floor, stable = self._decompose(lr_arr, batch_size, precondition_power)
        t = np.asarray(steps, float)[..., None]
        with np.errstate(over="ignore", invalid="ignore"):
            out = floor + np.sum(coef * np.sign(lam) ** t * np.abs(lam) ** t, axis=-1)
        return np.where(stable, out, np.inf)

    def _simulate(self, lrs: ArrayLike, batch_size: ArrayLike, power: float) -> np.ndarray:
        s = self.spectrum
        T = lrs.shape[-1]
        bs = np.broadcast_to(np.asarray(batch_size, float), (T,))
        h_tilde = s.h ** (1.0 - power)
        q = np.broadcast_to(s.init, lrs.shape[:-1] + s.h.shape).copy()
        out = np.empty(lrs.shape[:-1] + (T + 1,))
        out[..., 0] = 0.5 * np.sum(s.n * s.h * q, axis=-1)
        for k in range(T):
            lr = lrs[..., k, None]
            two_risk = np.sum(s.n * s.h * q, axis=-1, keepdims=True)
            q = ((1 - lr * h_tilde) ** 2 * q + lr * lr / bs[k] * s.h ** (-2 * power) * (s.h ** 2 * q + s.h * two_risk)
                 + self.label_noise * lr * lr / bs[k] * s.h ** (1 - 2 * power))
            out[..., k + 1] = 0.5 * np.sum(s.n * s.h * q, axis=-1)
        return out

    def steady_state_risk(self, lr: ArrayLike, batch_size: ArrayLike, *, precondition_power: float = 0.0,
                          momentum: ArrayLike | None = None, ema: ArrayLike | None = None) -> np.ndarray:
        self._check(momentum, ema, precondition_power)
        check.reals("lr", lr, check.POSITIVE)
        check.reals("batch_size", batch_size, check.POSITIVE)
        return self._decompose(lr, batch_size, precondition_power)[2]

    def steps_grid(self, batch_sizes: ArrayLike, lrs: ArrayLike, aux: ArrayLike = None, *, kind: str = "sgd",
                   precondition_power: float = 0.0, target: float = 0.01,
                   exhaustive: bool = True, effective_lr: bool = False, **search: Any) -> GridResult:
        """Exact (every grid point) minimal steps: bisection on t of the eigen-expansion, vectorized."""
        if kind != "sgd" or aux is not None:
            raise NotImplementedError(f"InterpolationModel models plain (preconditioned) SGD only: got kind={kind!r}; "
                                      f"momentum and ema must be None (use model='nqm' for them)")
        _check_search(self.spectrum, batch_sizes, lrs, precondition_power, target)
        check.flag("exhaustive", exhaustive)
        bs = np.atleast_1d(np.asarray(batch_sizes, float))
        lrs = np.asarray(lrs, float)
        lam, coef, floor, stable = self._decompose(lrs[None, :], bs[:, None], precondition_power)  # (nB, nlr, k)
        ok = stable & (floor < target)

        log_abs = np.log(np.maximum(np.abs(lam), 1e-300))
        neg = lam < 0

        def reached(t: ArrayLike) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore", under="ignore"):
                sign = np.where(neg & (np.mod(t, 2) == 1)[..., None], -1.0, 1.0)
                val = floor + np.sum(coef * sign * np.exp(t[..., None] * log_abs), axis=-1)
            return val <= target

        hi = np.full(ok.shape, T_MAX)
        lo = np.zeros(ok.shape)
        ok &= reached(hi)
        at1 = reached(np.ones(ok.shape))
        hi = np.where(at1, 1.0, hi)
        lo = np.where(at1, 0.0, 1.0)
        while True:
            active = ok & (hi - lo > 1)
            if not active.any():
                break
            mid = np.floor((lo + hi) / 2)
            r = reached(mid)
            hi = np.where(active & r, mid, hi)
            lo = np.where(active & ~r, mid, lo)
        steps = np.where(ok, hi, np.inf)
        idx = np.argmin(steps, axis=1)
        best = steps[np.arange(bs.size), idx]
        found = np.isfinite(best)
        return GridResult(best, np.where(found, idx, -1), np.full(bs.size, -1))
