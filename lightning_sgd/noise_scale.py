"""Gradient noise scale: pure torch estimators, the EMA smoother and the steps-vs-batch-size fit (no Trainer).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (Appendix A):

.. math::

    B_\\text{simple} = \\frac{\\operatorname{tr}\\Sigma}{|G|^2}, \\qquad
    \\mathbb E|g_b|^2 = |G|^2 + \\frac{\\operatorname{tr}\\Sigma}{b}

so squared norms of gradients of the *same parameters* at two batch sizes b < B give unbiased samples

.. math::

    |G|^2 \\approx \\frac{B|g_B|^2 - b|g_b|^2}{B - b}, \\qquad
    \\operatorname{tr}\\Sigma \\approx \\frac{|g_b|^2 - |g_B|^2}{1/b - 1/B}.

With W small batches (DDP ranks, accumulation micro-batches, batch-split parts) |g_b|² is their mean; with
per-example gradients b = 1. Single samples are noisy and can be negative: :class:`NoiseScaleEMA` keeps separate
bias-corrected EMAs of |G|² and tr Σ and reports the ratio of the EMAs (clamped only after averaging).

:func:`fit_steps_vs_batch` fits S(B) = S_min (1 + B_noise / B) to measured (batch size, steps-to-target) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NoiseScaleSample",
    "two_batch_estimate",
    "small_batches_estimate",
    "per_example_estimate",
    "NoiseScaleEMA",
    "fit_steps_vs_batch",
    "regime",
]


@dataclass(frozen=True)
class NoiseScaleSample:
    """One unbiased sample of |G|² and tr Σ (each may be negative; only their averages are meaningful)."""

    grad_sq_norm: float  # unbiased sample of |G|²
    trace_cov: float  # unbiased sample of tr Σ (per-example gradient covariance)
    b_small: float
    b_big: float


def _as_float(x: float | Tensor) -> float:
    return float(x.detach().double()) if isinstance(x, Tensor) else float(x)


def two_batch_estimate(sq_norm_small: float | Tensor, b_small: float, sq_norm_big: float | Tensor,
                       b_big: float) -> NoiseScaleSample:
    """Unbiased |G|² and tr Σ from |g_b|² (batch b) and |g_B|² (batch B > b), both at the same parameters.

    ``sq_norm_small`` may itself be the mean of several independent small batches' squared norms (unbiasedness
    only needs E|g_b|² = |G|² + tr Σ / b).

    >>> s = two_batch_estimate(3.0, 1, 1.2, 10)  # |G|² + trΣ = 3, |G|² + trΣ/10 = 1.2
    >>> round(s.grad_sq_norm, 6), round(s.trace_cov, 6)
    (1.0, 2.0)
    """
    b, big = float(b_small), float(b_big)
    if not (b > 0 and big > 0):
        raise ValueError(f"batch sizes must be positive, got b_small={b_small}, b_big={b_big}.")
    if big <= b:
        raise ValueError(
            f"the noise scale needs two different batch sizes b_small < b_big, got b_small={b_small}, "
            f"b_big={b_big}: the two gradient norms carry no information about the noise when B_small == B_big."
        )
    gb, gB = _as_float(sq_norm_small), _as_float(sq_norm_big)
    grad_sq = (big * gB - b * gb) / (big - b)
    trace = (gb - gB) / (1.0 / b - 1.0 / big)
    return NoiseScaleSample(grad_sq, trace, b, big)


def small_batches_estimate(small_sq_norms: Sequence[float] | Tensor, b_small: float,
                           big_sq_norm: float | Tensor) -> NoiseScaleSample:
    """W equal small batches of size b and the gradient of their union (batch W·b): the W-small-batch form.

    Used for DDP ranks (big = all-reduced gradient), accumulation micro-batches (big = their mean) and batch splits.
    """
    norms = torch.as_tensor(small_sq_norms, dtype=torch.float64).flatten()
    w = norms.numel()
    if w < 2:
        raise ValueError(f"need at least 2 small batches to compare with their union, got {w}.")
    return two_batch_estimate(norms.mean(), b_small, big_sq_norm, w * float(b_small))


def per_example_estimate(sq_norms: Tensor, mean_grad_sq_norm: float | Tensor) -> NoiseScaleSample:
    """The per-example form (b = 1): m₂ = mean_i |g_i|², ḡ = batch-mean gradient over B examples.

    |G|² ≈ (B|ḡ|² − m₂)/(B − 1),  tr Σ ≈ B(m₂ − |ḡ|²)/(B − 1).
    """
    n = int(sq_norms.numel())
    if n < 2:
        raise ValueError(
            f"the per-example noise-scale estimator needs a batch of at least 2 examples, got {n}; use a larger "
            "batch, gradient accumulation or DDP."
        )
    m2 = float(sq_norms.double().mean())
    g2 = _as_float(mean_grad_sq_norm)
    return NoiseScaleSample((n * g2 - m2) / (n - 1), n * (m2 - g2) / (n - 1), 1.0, float(n))


class NoiseScaleEMA:
    """Separate bias-corrected EMAs of |G|² and tr Σ; B_simple is the ratio of the EMAs (not an EMA of ratios).

    ``beta`` is the EMA decay per *measurement*. The bias correction (Adam-style: divide by 1 − β^t) makes the
    first measurements count fully instead of being pulled toward 0. The state is a handful of floats, saved and
    restored exactly by ``state_dict``/``load_state_dict``.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0  # 1 − β^t: the total weight the raw EMAs carry
        self.count = 0

    def update(self, sample: NoiseScaleSample) -> None:
        if not (math.isfinite(sample.grad_sq_norm) and math.isfinite(sample.trace_cov)):
            raise ValueError("NoiseScaleEMA.update got a non-finite sample; skip it before updating.")
        b = self.beta
        self._grad_sq = b * self._grad_sq + (1 - b) * sample.grad_sq_norm
        self._trace = b * self._trace + (1 - b) * sample.trace_cov
        self._weight = b * self._weight + (1 - b)
        self.count += 1

    @property
    def grad_sq_norm(self) -> float:
        """Debiased EMA of |G|² (NaN before the first update)."""
        return self._grad_sq / self._weight if self.count else math.nan

    @property
    def trace_cov(self) -> float:
        """Debiased EMA of tr Σ (NaN before the first update)."""
        return self._trace / self._weight if self.count else math.nan

    @property
    def b_simple(self) -> float:
        """tr Σ / |G|² from the EMAs; each clamped at a tiny positive value only now, after averaging.

        ``inf`` when the smoothed |G|² is ≤ 0 (pure noise: any batch size is "small"), NaN before any update.
        """
        if not self.count:
            return math.nan
        trace = max(self.trace_cov, 0.0)
        grad_sq = self.grad_sq_norm
        if grad_sq <= 0.0:
            return math.inf if trace > 0 else math.nan
        return trace / grad_sq

    def state_dict(self) -> dict[str, float | int]:
        return {"beta": self.beta, "grad_sq": self._grad_sq, "trace": self._trace, "weight": self._weight,
                "count": self.count}

    #: what :meth:`load_state_dict` needs (``beta`` may be missing: the current one is kept)
    STATE_KEYS = ("grad_sq", "trace", "weight", "count")

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"NoiseScaleEMA.load_state_dict: the state has no {missing} (it holds {sorted(state)}).")
        self.beta = float(state.get("beta", self.beta))
        self._grad_sq = float(state["grad_sq"])
        self._trace = float(state["trace"])
        self._weight = float(state["weight"])
        self.count = int(state["count"])


def regime(batch_size: float, b_simple: float) -> float:
    """log2(batch size / B_simple): < 0 noise-dominated (raising B still cuts steps ~linearly), > 0 curvature-dominated
    (diminishing returns). NaN when B_simple is unknown."""
    if not (b_simple > 0 and math.isfinite(b_simple)):
        return math.nan if not b_simple > 0 else -math.inf
    return math.log2(batch_size / b_simple)


def fit_steps_vs_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Fit S(B) = S_min (1 + B_noise / B) to measured (batch size, steps-to-target) pairs; return (S_min, B_noise).

    Least squares on log S (steps span orders of magnitude, so relative errors are what matter), started from the
    exact linear fit of S against 1/B. Needs at least two distinct batch sizes with positive steps.

    >>> s_min, b_noise = fit_steps_vs_batch([8, 32, 128, 512], [1000 * (1 + 100 / b) for b in (8, 32, 128, 512)])
    >>> round(s_min, 3), round(b_noise, 3)
    (1000.0, 100.0)
    """
    from scipy.optimize import least_squares

    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"batch_sizes and steps must be 1-D and the same length, got {b.shape} and {s.shape}.")
    keep = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
    b, s = b[keep], s[keep]
    if np.unique(b).size < 2:
        raise ValueError("fit_steps_vs_batch needs finite positive steps at >= 2 distinct batch sizes.")
    # Linear start: S = a + c / B with a = S_min, c = S_min·B_noise.
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, s, rcond=None)
    s_min0 = a if a > 0 else s.min() / 2
    b_noise0 = c / s_min0 if c > 0 else b.min()

    def residuals(theta: np.ndarray) -> np.ndarray:
        log_s_min, log_b_noise = theta
        return np.log(s) - (log_s_min + np.log1p(np.exp(log_b_noise) / b))

    result = least_squares(residuals, x0=[math.log(s_min0), math.log(max(b_noise0, 1e-12))], method="lm")
    log_s_min, log_b_noise = result.x
    return float(np.exp(log_s_min)), float(np.exp(log_b_noise))
