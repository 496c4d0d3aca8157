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
bias-corrected EMAs of |G|² and tr Σ and reports the ratio of the EMAs (clamped only after averaging), with a
standard error from the spread of the samples (delta method, see :meth:`NoiseScaleEMA.b_simple_se`).

The sample producers are pure functions of gradients or of a loss function: :func:`two_batch_estimate`,
:func:`small_batches_estimate`, :func:`micro_batches_estimate` (unequal micro-batches), :func:`per_example_estimate`,
:func:`split_estimate` (parts of one batch) and :func:`b_noise_estimate` (B_noise with Hessian-vector products).
The derivations are in docs/theory.md.

:func:`fit_steps_vs_batch` fits S(B) = S_min (1 + B_noise / B) to measured (batch size, steps-to-target) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_sgd.batches import batch_size as batch_size_of
from lightning_sgd.batches import slice_batch
from lightning_sgd.core import sq_norms

__all__ = [
    "NoiseScaleSample",
    "two_batch_estimate",
    "small_batches_estimate",
    "micro_batches_estimate",
    "per_example_estimate",
    "split_estimate",
    "b_noise_estimate",
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


def micro_batches_estimate(sum_sq_norms: float | Tensor, sum_inv_sizes: float, count: int,
                           mean_sq_norm: float | Tensor) -> NoiseScaleSample:
    """W = ``count`` small batches of possibly unequal sizes b_k (Σ_k |g_k|² = ``sum_sq_norms``, Σ_k 1/b_k =
    ``sum_inv_sizes``) and the squared norm of their plain mean gradient (``mean_sq_norm``).

    E mean_k |g_k|² = |G|² + tr Σ / b_eff with b_eff = W / Σ_k 1/b_k, and the mean of the W gradients has
    E|.|² = |G|² + tr Σ / (W·b_eff): the two-batch estimator with those sizes (equal sizes give
    :func:`small_batches_estimate`).

    >>> s = micro_batches_estimate(2 * (1 + 2 / 4), 2 / 4, 2, 1 + 2 / 8)  # |G|² = 1, trΣ = 2, two batches of 4
    >>> round(s.grad_sq_norm, 6), round(s.trace_cov, 6), s.b_small, s.b_big
    (1.0, 2.0, 4.0, 8.0)
    """
    if count < 2:
        raise ValueError(f"need at least 2 small batches to compare with their mean, got {count}.")
    b_eff = count / float(sum_inv_sizes)
    return two_batch_estimate(_as_float(sum_sq_norms) / count, b_eff, mean_sq_norm, count * b_eff)


def _groups(groups: Tensor | None, count: int) -> Tensor:
    return torch.ones(count, 1, dtype=torch.float64) if groups is None else groups.to(torch.float64)


def split_estimate(loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any, parts: int,
                   groups: Tensor | None = None, who: str = "split_estimate") -> list[NoiseScaleSample]:
    """Split ``batch`` into ``parts`` equal parts (the remainder dropped), take the gradient of ``loss_fn(part)``
    with respect to ``params`` for each, and compare the parts (b = n // parts) with their mean (B = parts·b).

    Args:
        loss_fn: the mean loss of a batch (any structure :func:`lightning_sgd.batches.slice_batch` can slice).
        params: the parameters; a parameter the loss does not use counts as a zero gradient.
        parts: number of parts, >= 2 (at most the number of examples).
        groups: ``(len(params), K)`` 0/1 matrix: one sample per column, over the parameters it selects (e.g. the
            total and each layer). ``None``: one sample over all parameters.

    Returns:
        K :class:`NoiseScaleSample` (one per column of ``groups``).
    """
    n = batch_size_of(batch, who)
    parts = min(parts, n)
    if parts < 2:
        raise ValueError(f"{who}: a split needs at least 2 examples, got {n}.")
    size = n // parts
    small, mean = [], [torch.zeros_like(p) for p in params]
    for k in range(parts):
        part = slice_batch(batch, slice(k * size, (k + 1) * size), who)
        grads = torch.autograd.grad(loss_fn(part), list(params), allow_unused=True)
        small.append(sq_norms(list(grads)).cpu())
        for m, g in zip(mean, grads):
            if g is not None:
                m.add_(g, alpha=1.0 / parts)
    weights = _groups(groups, len(params))
    small_groups = torch.stack(small) @ weights  # (parts, K)
    big_groups = sq_norms(mean).cpu() @ weights  # (K,)
    return [small_batches_estimate(small_groups[:, j], size, big_groups[j]) for j in range(weights.shape[1])]


def b_noise_estimate(loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any, groups: int,
                     who: str = "b_noise_estimate") -> NoiseScaleSample:
    """One unbiased sample of (GᵀHG, tr HΣ), stored in the (``grad_sq_norm``, ``trace_cov``) slots, so that an EMA
    of them gives B_noise = tr(HΣ)/(GᵀHG) (McCandlish et al. 2018, Appendix A) as its ``b_simple``.

    The first half of ``batch`` gives ``groups`` group gradients g_k of ``size = (n // 2) // groups`` examples; the
    second half the Hessian H (independent of the g_k, so E g_kᵀHg_k = GᵀHG + tr(HΣ)/size and the two-batch-size
    estimator on the quadratic forms stays unbiased). Hessian-vector products by double backward: one forward and
    backward that keeps its graph, then one backward per product (all products see the same dropout masks).
    Double backward rather than ``torch.func.jvp`` of ``grad``: forward-mode AD fails on ordinary losses and on
    many custom kernels. Costs ``groups`` gradients and ``groups + 1`` Hessian-vector products.
    """
    n = batch_size_of(batch, who)
    size = (n // 2) // groups
    if size < 1:
        raise ValueError(f"{who}: a batch of {n} example(s) is too small for {groups} groups: it needs "
                         f">= {2 * groups} (half split into the groups, half for the Hessian).")
    params = list(params)
    group_grads = []
    for k in range(groups):
        part = slice_batch(batch, slice(k * size, (k + 1) * size), who)
        grads = torch.autograd.grad(loss_fn(part), params, allow_unused=True)
        group_grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    hessian_batch = slice_batch(batch, slice(n // 2, n), who)  # independent of the gradients
    first = torch.autograd.grad(loss_fn(hessian_batch), params, create_graph=True, allow_unused=True)
    rows = [i for i, g in enumerate(first) if g is not None and g.requires_grad]  # others: zero rows of H

    def quad(v: list[Tensor]) -> float:  # vᵀHv
        if not rows:
            return 0.0
        hv = torch.autograd.grad([first[i] for i in rows], params, grad_outputs=[v[i] for i in rows],
                                 retain_graph=True, allow_unused=True)
        return float(sum((x.double() * h.double()).sum() for x, h in zip(v, hv) if h is not None))

    q_small = sum(quad(g) for g in group_grads) / groups
    q_big = quad([sum(g[i] for g in group_grads) / groups for i in range(len(params))])
    return two_batch_estimate(q_small, size, q_big, groups * size)


class NoiseScaleEMA:
    r"""Separate bias-corrected EMAs of |G|² and tr Σ; B_simple is the ratio of the EMAs (not an EMA of ratios),
    with a standard error from the spread of the samples.

    ``beta`` is the EMA decay per *measurement*. The bias correction (Adam-style: divide by the total weight
    W = 1 − β^t) makes the first measurements count fully instead of being pulled toward 0. The state is a handful
    of floats, saved and restored exactly by ``state_dict``/``load_state_dict``.

    **Standard error** (:attr:`b_simple_se`). With normalized weights w̃_t (Σ w̃_t = 1) the smoothed values are
    x̄ = Σ w̃_t x_t (|G|² samples) and ȳ = Σ w̃_t y_t (tr Σ samples). For samples with covariance C,
    Cov(x̄, ȳ) = C Σ w̃_t² = C / n_eff, with the effective sample count n_eff = W² / Σ w_t² (→ (1 + β)/(1 − β)
    for a long run with constant β). The delta method for B = ȳ/x̄ gives

    .. math::

        \operatorname{SE}(B)^2 = rac{C_{yy} - 2 B\, C_{xy} + B^2 C_{xx}}{n_	ext{eff}\; ar x^2},

    where C is the EMA-weighted covariance of the (x_t, y_t) pairs with the reliability-weights correction
    1/(1 − 1/n_eff) (unbiased for independent samples). It is the sampling error of the smoothed value given the
    scatter of the measurements; it does not include the drift of the true value over the EMA's window, and it is
    optimistic when x̄ is within a few standard errors of 0 (the ratio is then heavy-tailed). NaN before two
    measurements, with ``beta = 0`` (one sample carries all the weight) and whenever B_simple is not finite.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0  # W = Σ w_t = 1 − β^t: the total weight the raw EMAs carry
        self._weight_sq = 0.0  # Σ w_t²: how unequal the weights are (n_eff = W² / Σ w_t²)
        self._moments = [0.0, 0.0, 0.0]  # raw EMAs of x², y², x·y (x = |G|² sample, y = tr Σ sample)
        self._moments_weight = 0.0  # the weight the moments carry (W, unless they restarted: load_state_dict)
        self._moments_count = 0
        self.count = 0

    def update(self, sample: NoiseScaleSample) -> None:
        x, y = sample.grad_sq_norm, sample.trace_cov
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError("NoiseScaleEMA.update got a non-finite sample; skip it before updating.")
        b, a = self.beta, 1.0 - self.beta
        self._grad_sq = b * self._grad_sq + a * x
        self._trace = b * self._trace + a * y
        self._weight = b * self._weight + a
        self._weight_sq = b * b * self._weight_sq + a * a
        self._moments = [b * m + a * v for m, v in zip(self._moments, (x * x, y * y, x * y))]
        self._moments_weight = b * self._moments_weight + a
        self._moments_count += 1
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
    def effective_count(self) -> float:
        """n_eff = W² / Σ w_t²: how many equally weighted samples the EMA is worth (0 before the first update)."""
        return self._weight**2 / self._weight_sq if self.count else 0.0

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

    @property
    def b_simple_se(self) -> float:
        """Standard error of :attr:`b_simple` by the delta method (see the class docstring); NaN when undefined."""
        ratio, x_mean, y_mean = self.b_simple, self.grad_sq_norm, self.trace_cov
        excess = self._weight**2 - self._weight_sq  # W² (1 − 1/n_eff)
        if self._moments_count < 2 or not math.isfinite(ratio) or not x_mean > 0.0 or not excess > 0.0:
            return math.nan
        xx, yy, xy = (m / self._moments_weight for m in self._moments)
        c_xx, c_yy, c_xy = xx - x_mean**2, yy - y_mean**2, xy - x_mean * y_mean
        residual = max(c_yy - 2.0 * ratio * c_xy + ratio**2 * c_xx, 0.0)  # variance of y − B·x
        se = math.sqrt(residual * self._weight_sq / excess) / x_mean
        return se if math.isfinite(se) else math.nan

    def state_dict(self) -> dict[str, float | int]:
        return {"beta": self.beta, "grad_sq": self._grad_sq, "trace": self._trace, "weight": self._weight,
                "count": self.count, "weight_sq": self._weight_sq, "moments": list(self._moments),
                "moments_weight": self._moments_weight, "moments_count": self._moments_count}

    #: what :meth:`load_state_dict` needs (``beta`` may be missing: the current one is kept; the standard error's
    #: keys too: see :meth:`load_state_dict`)
    STATE_KEYS = ("grad_sq", "trace", "weight", "count")

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore the state. A state without the standard error's keys (``weight_sq``, ``moments``, ...; written
        before the EMA had them) keeps the smoothed values, takes Σ w_t² as a constant β would have made it, and
        restarts the second moments: the standard error is NaN until two more updates."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"NoiseScaleEMA.load_state_dict: the state has no {missing} (it holds {sorted(state)}).")
        self.beta = float(state.get("beta", self.beta))
        self._grad_sq = float(state["grad_sq"])
        self._trace = float(state["trace"])
        self._weight = float(state["weight"])
        self.count = int(state["count"])
        b = self.beta  # Σ_t ((1 − β) β^(t−1))² for t = 1..count
        self._weight_sq = float(state.get("weight_sq", (1 - b) ** 2 * (1 - b ** (2 * self.count)) / (1 - b * b)))
        self._moments = [float(v) for v in state.get("moments", (0.0, 0.0, 0.0))]  # type: ignore[union-attr]
        self._moments_weight = float(state.get("moments_weight", 0.0))
        self._moments_count = int(state.get("moments_count", 0))


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
