"""The per-example gradient engine shared by GradientNoiseScale and GradientDiversity.

``per_example_gradient_stats(module, batch)`` runs the module's loss on every example of ``batch`` separately with
``torch.func.functional_call`` + ``vmap(grad)``, one chunk of examples at a time, and reduces each chunk at once to

- per-example squared gradient norms |g_i|² (total, and optionally per layer),
- the running sum of the per-example gradients (returned as the batch-mean gradient ḡ),
- optionally the projections g_i · v_j onto a few fixed directions,

so no more than ``chunk_size`` per-example gradients ever exist at the same time (memory ≈ chunk_size × #params).

The module must implement the :mod:`lightning_sgd.protocols` contract; the loss of a batch of one example is that
example's loss, so g_i is the gradient of example i's loss and ḡ = mean_i g_i is the gradient of the mean loss.

BatchNorm: per-example gradients of a BatchNorm layer in train mode are ill-defined (an example's loss depends on the
whole batch through the batch statistics). The engine therefore runs BatchNorm layers in eval mode (running
statistics) and restores their mode afterwards; a BatchNorm without running statistics
(``track_running_stats=False``) has no eval mode and raises a ``ValueError``. Dropout keeps its mode and draws
independent masks per example (``vmap(randomness="different")``). The global RNG state is restored afterwards, so
measuring never changes the training trajectory.

References: the per-example-gradients recipe of the torch.func documentation; Yin et al. 2018 (gradient diversity);
McCandlish et al. 2018 (noise scale from per-example norms).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from lightning_sgd.protocols import require_supervised, slice_examples

__all__ = ["PerExampleStats", "per_example_gradient_stats", "batchnorm_eval", "trainable_parameters", "layer_of"]


@dataclass
class PerExampleStats:
    """What one pass of the engine returns (all on the parameters' device).

    Attributes:
        sq_norms: (n,) float64, |g_i|² for each example.
        layer_sq_norms: layer name -> (n,) float64 |g_i restricted to that layer|², or ``None`` unless ``per_layer``.
            A layer is the module that owns the parameters (``"network.0"`` holds ``network.0.weight`` and ``.bias``).
        mean_grad: batch-mean gradient ḡ, one tensor per trainable parameter in ``module.parameters()`` order.
        projections: (n, k) float64 g_i · v_j for the rows v_j of ``directions``, or ``None``.
        n: number of examples.
    """

    sq_norms: Tensor
    layer_sq_norms: dict[str, Tensor] | None
    mean_grad: list[Tensor]
    projections: Tensor | None
    n: int


def trainable_parameters(module: nn.Module) -> dict[str, Tensor]:
    """Name -> parameter for the parameters that require grad, in ``module.parameters()`` order (shared ones once)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def layer_of(param_name: str) -> str:
    """The layer (owning module) of a parameter name: ``"network.0.weight"`` -> ``"network.0"``."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


@contextlib.contextmanager
def batchnorm_eval(module: nn.Module) -> Iterator[int]:
    """Put every BatchNorm layer in eval mode (running statistics) inside the block; restore each one's mode after.

    Yields how many BatchNorm layers were in train mode. Raises ``ValueError`` for a BatchNorm without running
    statistics, whose per-example gradients have no well-defined meaning.
    """
    switched = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            if not sub.track_running_stats or sub.running_mean is None:
                raise ValueError(
                    f"BatchNorm layer {name!r} has track_running_stats=False, so it has no eval mode and per-example "
                    "gradients through it are ill-defined. Use track_running_stats=True, replace it by GroupNorm/"
                    "LayerNorm, or measure with a batch-split source (GradientNoiseScale(source='split'))."
                )
            if sub.training:
                switched.append(sub)
                sub.eval()
    try:
        yield len(switched)
    finally:
        for sub in switched:
            sub.train()


def _batch_size(tree: Any) -> int:
    leaves = [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)]
    if not leaves:
        raise TypeError("per_example_gradient_stats: the batch's inputs contain no tensor to split into examples.")
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.shape[0] != n:
            raise ValueError(f"per_example_gradient_stats: inconsistent batch dimensions {leaf.shape[0]} vs {n}.")
    return n


def per_example_gradient_stats(
    module: nn.Module,
    batch: Any,
    *,
    chunk_size: int | None = 64,
    per_layer: bool = False,
    directions: Tensor | None = None,
) -> PerExampleStats:
    """Per-example squared gradient norms, the batch-mean gradient and optional projections, chunk by chunk.

    Args:
        module: implements ``split_batch``/``forward``/``loss`` (:mod:`lightning_sgd.protocols`), loss a mean.
        batch: a batch as the dataloader yields it; ``module.split_batch(batch)`` gives ``(inputs, targets)``.
        chunk_size: examples whose gradients are materialized at once (``None``: the whole batch). Peak extra
            memory ≈ chunk_size × #trainable parameters × dtype size.
        per_layer: also return squared norms per layer.
        directions: optional (k, P) tensor over the flattened trainable parameters (``module.parameters()``
            order); returns g_i · v_j as ``projections`` (n, k).

    Returns:
        :class:`PerExampleStats`.
    """
    require_supervised(module, "per_example_gradient_stats")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    inputs, targets = module.split_batch(batch)
    n = _batch_size(inputs)
    if n < 1:
        raise ValueError("per_example_gradient_stats: the batch is empty.")
    params = trainable_parameters(module)
    if not params:
        raise ValueError(f"per_example_gradient_stats: {type(module).__name__} has no trainable parameters.")
    names = list(params)
    detached = {name: p.detach() for name, p in params.items()}
    total = sum(p.numel() for p in detached.values())
    if directions is not None:
        if directions.dim() != 2 or directions.shape[1] != total:
            raise ValueError(f"directions must have shape (k, {total}) (k directions over the flattened trainable "
                             f"parameters), got {tuple(directions.shape)}.")
        # One (k, numel) block of the directions per parameter, in the same order.
        blocks = torch.split(directions.to(next(iter(detached.values())).dtype), [p.numel() for p in detached.values()],
                             dim=1)
    layers = list(dict.fromkeys(layer_of(name) for name in names)) if per_layer else []

    def example_loss(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)  # a batch of one example
        y1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, y)
        out = functional_call(module, p, (x1,))
        return module.loss(out, y1)

    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")

    device = next(iter(detached.values())).device
    sq_norms = torch.zeros(n, dtype=torch.float64, device=device)
    layer_sq = {layer: torch.zeros(n, dtype=torch.float64, device=device) for layer in layers}
    projections = (torch.zeros(n, directions.shape[0], dtype=torch.float64, device=device)
                   if directions is not None else None)
    grad_sum = {name: torch.zeros_like(p) for name, p in detached.items()}
    step = n if chunk_size is None else chunk_size
    devices = [device] if device.type == "cuda" else []
    with batchnorm_eval(module), torch.random.fork_rng(devices=devices), torch.enable_grad():
        for start in range(0, n, step):
            stop = min(n, start + step)
            grads = per_example_grad(detached, slice_examples(inputs, slice(start, stop)),
                                     slice_examples(targets, slice(start, stop)))
            for index, name in enumerate(names):
                g = grads[name].reshape(stop - start, -1)  # (c, numel); also for 0-dim parameters
                sq = torch.linalg.vector_norm(g, dim=1).to(torch.float64).square()  # (c,), no (c, numel) temporary
                sq_norms[start:stop] += sq
                if per_layer:
                    layer_sq[layer_of(name)][start:stop] += sq
                if projections is not None:
                    projections[start:stop] += (g @ blocks[index].T).to(torch.float64)  # (c, k)
                grad_sum[name] += grads[name].sum(0)
            del grads
    mean_grad = [grad_sum[name] / n for name in names]
    return PerExampleStats(
        sq_norms=sq_norms,
        layer_sq_norms=layer_sq if per_layer else None,
        mean_grad=mean_grad,
        projections=projections,
        n=n,
    )
