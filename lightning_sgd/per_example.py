"""The per-example gradient engine shared by GradientNoiseScale, GradientDiversity and the curvature alignment check.

``per_example_gradient_stats(module, batch)`` differentiates the module's training loss on every example of
``batch`` separately and reduces each chunk of examples at once to

- per-example squared gradient norms |g_i|² (total, and optionally per layer),
- the running sum of the per-example gradients (returned as the batch-mean gradient ḡ),
- optionally the projections g_i · v_j onto a few fixed directions,

so no more than ``chunk_size`` per-example gradients ever exist at the same time (memory ≈ chunk_size × #params).

The loss is the module's own (:class:`lightning_sgd.module_loss.ModuleLoss`): its ``training_step``, or
``loss(forward(inputs), targets)`` when it implements the optional ``split_batch``/``forward``/``loss`` protocol. The
loss of a batch of one example is that example's loss, so g_i is the gradient of example i's loss and
ḡ = mean_i g_i is the gradient of the batch's (mean) loss. The batch may have any structure
(:mod:`lightning_sgd.batches`): the tensors that carry the example dimension are split into examples, the others
(BERT's ``(1, T)`` position ids, strings, numbers) are passed whole to every example.

Two ways to get the g_i, same result:

- ``torch.func``: ``vmap(grad(loss of a one-example batch))`` over the examples of a chunk (the fast path);
- a loop over the examples, ``torch.autograd.grad`` of each one-example batch's loss, when ``vmap`` cannot run the
  model (an op or ``autograd.Function`` without a batching rule, ``.item()`` or data-dependent control flow in
  ``training_step``, some RNN kernels). It warns once per module, saying why, and is used for that module from then
  on; it is slower (one forward and backward per example) but computes the same statistics.

BatchNorm: per-example gradients of a BatchNorm layer in train mode are ill-defined (an example's loss depends on the
whole batch through the batch statistics). The engine therefore runs BatchNorm layers in eval mode (running
statistics) and restores their mode afterwards; a BatchNorm without running statistics
(``track_running_stats=False``) has no eval mode and raises a ``ValueError``. Dropout keeps its mode and draws
independent masks per example. Everything runs inside :meth:`ModuleLoss.isolated`: ``self.log`` is muted, the RNG is
forked, buffers and modes are restored and ``.grad`` is untouched, so measuring never changes the training
trajectory or what the module logs.

References: the per-example-gradients recipe of the torch.func documentation; Yin et al. 2018 (gradient diversity);
McCandlish et al. 2018 (noise scale from per-example norms).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from lightning_sgd.batches import flatten_batch
from lightning_sgd.module_loss import ModuleLoss

__all__ = ["PerExampleStats", "per_example_gradient_stats", "batchnorm_eval", "trainable_parameters", "layer_of"]

#: Modules whose loss ``vmap`` could not run -> why; they use the per-example loop from then on.
_NO_VMAP: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
#: Modules the loop fallback has been announced for (once each).
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


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


def per_example_gradient_stats(
    module: nn.Module,
    batch: Any,
    *,
    loss: ModuleLoss | None = None,
    chunk_size: int | None = 64,
    per_layer: bool = False,
    directions: Tensor | None = None,
) -> PerExampleStats:
    """Per-example squared gradient norms, the batch-mean gradient and optional projections, chunk by chunk.

    Args:
        module: any LightningModule (or ``nn.Module``) with ``training_step`` or the ``split_batch``/``forward``/
            ``loss`` protocol; its loss must be a mean over the examples of the batch.
        batch: a batch as the dataloader yields it (tensor, tuple, dict, ``BatchEncoding``, dataclass, nested).
        loss: the :class:`ModuleLoss` to differentiate (default: ``ModuleLoss(module, "per_example_gradient_stats")``).
        chunk_size: examples whose gradients are materialized at once (``None``: the whole batch). Peak extra
            memory ≈ chunk_size × #trainable parameters × dtype size.
        per_layer: also return squared norms per layer.
        directions: optional (k, P) tensor over the flattened trainable parameters (``module.parameters()``
            order); returns g_i · v_j as ``projections`` (n, k).

    Returns:
        :class:`PerExampleStats`.
    """
    return _per_example_stats(module, batch, loss=loss, chunk_size=chunk_size, per_layer=per_layer,
                              directions=directions, quiet=False)


def _per_example_stats(module: nn.Module, batch: Any, *, loss: ModuleLoss | None, chunk_size: int | None,
                       per_layer: bool, directions: Tensor | None, quiet: bool) -> PerExampleStats:
    """:func:`per_example_gradient_stats`; ``quiet``: do not announce the loop fallback (a one-off cross-check)."""
    who = "per_example_gradient_stats"
    loss = ModuleLoss(module, who) if loss is None else loss
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    batched, rebuild, n = flatten_batch(batch, who)
    if n < 1:
        raise ValueError(f"{who}: the batch is empty.")
    params = trainable_parameters(module)
    if not params:
        raise ValueError(f"{who}: {type(module).__name__} has no trainable parameters.")
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

    def example_loss(p: dict[str, Tensor], *leaves: Tensor) -> Tensor:
        return loss.functional_loss(p, rebuild([t.unsqueeze(0) for t in leaves]))  # a batch of one example

    vmapped = vmap(grad(example_loss), in_dims=(None, *([0] * len(batched))), randomness="different")

    def looped(start: int, stop: int) -> dict[str, Tensor]:
        rows = []
        for i in range(start, stop):
            one = loss.loss(rebuild([t[i:i + 1] for t in batched]))
            rows.append(torch.autograd.grad(one, list(params.values()), allow_unused=True))
        return {name: torch.stack([torch.zeros_like(detached[name]) if row[j] is None else row[j] for row in rows])
                for j, name in enumerate(names)}

    def chunk_grads(start: int, stop: int) -> dict[str, Tensor]:
        if module not in _NO_VMAP:
            try:
                return vmapped(detached, *(t[start:stop] for t in batched))
            except Exception as err:  # noqa: BLE001 - any vmap failure; a real error in the loss re-raises below
                _NO_VMAP[module] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
        if not quiet and module not in _WARNED:
            _WARNED.add(module)
            warnings.warn(f"{who}: torch.func.vmap cannot run {type(module).__name__}'s loss ({_NO_VMAP[module]}); "
                          "computing the same per-example gradients with a loop over examples instead, which is "
                          "slower (one forward and backward per example).", stacklevel=4)
        return looped(start, stop)

    device = next(iter(detached.values())).device
    sq_norms = torch.zeros(n, dtype=torch.float64, device=device)
    layer_sq = {layer: torch.zeros(n, dtype=torch.float64, device=device) for layer in layers}
    projections = (torch.zeros(n, directions.shape[0], dtype=torch.float64, device=device)
                   if directions is not None else None)
    grad_sum = {name: torch.zeros_like(p) for name, p in detached.items()}
    step = n if chunk_size is None else chunk_size
    with loss.isolated(), batchnorm_eval(module):
        for start in range(0, n, step):
            stop = min(n, start + step)
            grads = chunk_grads(start, stop)
            _reduce(grads, names, start, stop, sq_norms, layer_sq if per_layer else None, projections,
                    blocks if directions is not None else None, grad_sum)
            del grads
    mean_grad = [grad_sum[name] / n for name in names]
    return PerExampleStats(
        sq_norms=sq_norms,
        layer_sq_norms=layer_sq if per_layer else None,
        mean_grad=mean_grad,
        projections=projections,
        n=n,
    )


def _reduce(grads: dict[str, Tensor], names: list[str], start: int, stop: int, sq_norms: Tensor,
            layer_sq: dict[str, Tensor] | None, projections: Tensor | None, blocks: Any,
            grad_sum: dict[str, Tensor]) -> None:
    """Add one chunk's per-example gradients (name -> (c, *shape)) into the running statistics, in place."""
    for index, name in enumerate(names):
        g = grads[name].reshape(stop - start, -1)  # (c, numel); also for 0-dim parameters
        sq = torch.linalg.vector_norm(g, dim=1).to(torch.float64).square()  # (c,), no (c, numel) temporary
        sq_norms[start:stop] += sq
        if layer_sq is not None:
            layer_sq[layer_of(name)][start:stop] += sq
        if projections is not None:
            projections[start:stop] += (g @ blocks[index].T).to(torch.float64)  # (c, k)
        grad_sum[name] += grads[name].sum(0)
