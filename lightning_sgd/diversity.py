"""Gradient diversity (Yin et al. 2018, "Gradient Diversity: a Key Ingredient for Scalable Distributed Learning"):
pure functions over per-example gradient statistics (no Trainer).

.. math::

    \\Delta(w) = \\frac{\\sum_{i=1}^n |\\nabla f_i(w)|^2}{|\\sum_{i=1}^n \\nabla f_i(w)|^2}
              = \\frac{m_2}{n\\,|\\bar g|^2},\\qquad m_2 = \\tfrac1n\\sum_i |g_i|^2,\\ \\bar g = \\tfrac1n\\sum_i g_i.

All n gradients identical gives 1/n; mutually orthogonal gives 1. Mini-batch SGD with batch size
B ≤ δ·n·Δ + 1 makes about B times the progress of one serial step (Yin et al., Theorem 3). On the same n examples
the per-example noise-scale estimator satisfies 1 + B̂_simple = (n − 1)Δ/(1 − Δ) exactly: with m₂ and |ḡ|² as above,
B̂_simple = n(m₂ − |ḡ|²)/(n|ḡ|² − m₂) and Δ = m₂/(n|ḡ|²).
"""

from __future__ import annotations

import math

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor

from lightning_sgd.core import sq_norms
from lightning_sgd.per_example import PerExampleStats, layer_of

__all__ = ["gradient_diversity", "batch_size_bound", "diversity_from_stats"]


def gradient_diversity(sq_norms: Tensor, mean_grad_sq_norm: float | Tensor) -> float:
    """Δ from per-example squared norms |g_i|² (n,) and the squared norm of their mean |ḡ|².

    Returns NaN when Δ is undefined: n < 2 is allowed (Δ = 1 for one example) but |Σ g_i|² = 0 (all-zero or
    cancelling gradients) and non-finite inputs give NaN; callers skip and count those.

    >>> gradient_diversity(torch.tensor([1.0, 1.0]), 1.0)  # two identical unit gradients: 1/n
    0.5
    >>> gradient_diversity(torch.tensor([1.0, 1.0]), 0.5)  # two orthogonal unit gradients: |mean|² = 1/2
    1.0
    """
    n = int(sq_norms.numel())
    if n < 1:
        raise ValueError("gradient_diversity needs at least one example.")
    m2 = float(sq_norms.double().mean())
    g2 = float(mean_grad_sq_norm.double() if isinstance(mean_grad_sq_norm, Tensor) else mean_grad_sq_norm)
    if not (math.isfinite(m2) and math.isfinite(g2)) or g2 <= 0.0:
        return math.nan
    return m2 / (n * g2)


def batch_size_bound(diversity: float, n: int, delta: float = 1.0) -> float:
    """Yin et al.'s batch-size bound B ≤ δ·n·Δ + 1 (δ ∈ (0, 1] trades speed-up for its guarantee).

    >>> batch_size_bound(0.05, 1000, delta=0.5)
    26.0
    """
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1], got {delta}.")
    return delta * n * diversity + 1.0


def diversity_from_stats(
    stats: PerExampleStats, param_names: list[str] | None = None
) -> tuple[float, dict[str, float]]:
    """Δ, and Δ per layer, from one pass of the per-example engine.

    Args:
        stats: :func:`lightning_sgd.per_example.per_example_gradient_stats` output.
        param_names: the trainable parameter names in ``stats.mean_grad`` order
            (``list(lightning_sgd.per_example.trainable_parameters(module))``); needed for the per-layer values,
            which use only that layer's coordinates of the gradients.

    Returns:
        ``(delta, {layer: delta_layer})``; the dict is empty unless the stats have per-layer norms and names are given.
    """
    per_param = sq_norms(stats.mean_grad, precise=True).cpu().tolist()
    mean_sq = sum(per_param)
    layers: dict[str, float] = {}
    if stats.layer_sq_norms is not None and param_names is not None:
        layer_mean_sq: dict[str, float] = {}
        for name, value in zip(param_names, per_param):
            layer = layer_of(name)
            layer_mean_sq[layer] = layer_mean_sq.get(layer, 0.0) + value
        layers = {layer: gradient_diversity(sq, layer_mean_sq[layer]) for layer, sq in stats.layer_sq_norms.items()}
    return gradient_diversity(stats.sq_norms, mean_sq), layers
