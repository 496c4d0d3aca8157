"""Mechanisms the measurement callbacks and the gradient-statistics strategy share, each spelled once.

- :func:`sq_norms`: squared norms of a list of gradients (one fused pass; ``None``, half precision, sparse).
- :func:`amp_scale`: the loss scale a ``GradScaler`` applied to this backward (1.0 without one).
- :func:`at_backward_end`: run a function at the end of a backward pass, before DDP's own end-of-backward callback
  overwrites ``.grad`` with the all-reduced average.
- :func:`per_example_engine`: which per-example engine (layer hooks or ``vmap``) serves a module.
- :func:`log_metrics`: log a dict of floats to every logger of a Trainer, once (global rank 0).

Counting the examples of a batch is :func:`lightning_sgd.batches.batch_size` (raises, never returns 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["amp_scale", "at_backward_end", "log_metrics", "per_example_engine", "sq_norms"]

_FULL = (torch.float32, torch.float64)


def sq_norms(tensors: Sequence[Tensor | None], precise: bool = False) -> Tensor:
    """``(k,)`` float64 squared norms |t|² of ``k`` tensors, on their device (no host sync): one fused
    ``torch._foreach_norm`` call; ``None`` counts 0, sparse tensors by their values. Accumulated in the tensors'
    dtype (fp16/bf16 in fp32), or in float64 with ``precise`` (for pure functions compared with float64 references;
    the per-step paths keep the cheaper default).

    >>> sq_norms([torch.tensor([3.0, 4.0]), None, torch.ones(4, dtype=torch.float16)]).tolist()
    [25.0, 0.0, 4.0]
    """
    groups: dict[torch.dtype, list[tuple[int, Tensor]]] = {}  # one fused call per dtype
    for i, t in enumerate(tensors):
        if t is not None:
            t = t.coalesce().values() if t.is_sparse else t
            groups.setdefault(t.dtype, []).append((i, t))
    if not groups:
        return torch.zeros(len(tensors), dtype=torch.float64)
    order, parts = [], []
    with torch.no_grad():
        for dtype, group in groups.items():
            kwargs = {"dtype": torch.float64} if precise else {} if dtype in _FULL else {"dtype": torch.float32}
            parts.append(torch.stack(torch._foreach_norm([t for _, t in group], **kwargs)).double())
            order += [i for i, _ in group]
        values = torch.cat(parts).square() if len(parts) > 1 else parts[0].square()
    if order == list(range(len(tensors))):
        return values
    out = torch.zeros(len(tensors), dtype=torch.float64, device=values.device)
    out[torch.tensor(order, device=values.device)] = values
    return out


def amp_scale(precision_plugin: Any) -> float:
    """The factor a ``GradScaler`` multiplied the loss by for the current backward; 1.0 without an enabled scaler
    (bf16, fp32, or no precision plugin). Read it before ``scaler.update()``, i.e. before the optimizer step."""
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def at_backward_end(loss: Tensor, fn: Callable[[], None]) -> None:
    """Run ``fn()`` at the end of the backward pass that is about to start from ``loss``.

    A hook on ``loss`` (the first node the backward visits) queues ``fn`` as an autograd-engine callback. Engine
    callbacks run in the order they are queued, and DistributedDataParallel queues its own (which copies the
    all-reduced buckets into ``.grad``) only when its last bucket is ready, later in the same backward: so ``fn``
    sees every parameter's *local* ``.grad`` of a synced DDP backward, and a collective it launches overlaps DDP's
    wait for the last bucket. Call it before ``loss.backward()`` (e.g. from ``on_before_backward``), and only for a
    loss that requires grad.
    """

    def queue(grad: Tensor) -> None:
        # Private torch API (no public way to queue an engine callback; torch's own DDP and FSDP use this one).
        torch.autograd.Variable._execution_engine.queue_callback(fn)

    loss.register_hook(queue)


def per_example_engine(module: nn.Module, engine: str, who: str, context: Sequence[str] = (),
                       layers: str = "all") -> tuple[str, list[str]]:
    """``("hooks" | "vmap", reasons)``: the per-example engine for ``module`` given the requested ``engine``, and
    why the hooks do not apply (empty when they do, or when ``engine="vmap"`` was asked for).

    The layer-hook engine (:mod:`lightning_sgd.per_example_hooks`) serves a module when it has no unsupported
    layer (among the normalization layers for ``layers="norm"``), no BatchNorm (per-example gradients are
    ill-defined in train mode) and no ``context`` reason (the caller's own, e.g. "more than one process" for
    hooks that read the training backward). ``"auto"`` picks it then and ``vmap`` otherwise; ``"hooks"`` with a
    reason raises a ``ValueError`` naming ``who`` and the reasons. This is the static part of the choice, known at
    setup; with ``"auto"`` the callers then time both engines once on their first batch
    (:func:`lightning_sgd.per_example_hooks.choose_engine`) and check the hooks against ``vmap`` on a few examples
    at their first measurement.
    """
    from lightning_sgd.per_example_hooks import unsupported_layers  # the engines are not needed by every caller

    if engine == "vmap":
        return "vmap", []
    reasons = unsupported_layers(module, layers) + [
        f"{name or type(module).__name__}: BatchNorm" for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)] + list(context)
    if not reasons:
        return "hooks", []
    if engine == "hooks":
        raise ValueError(f"{who}(engine='hooks') cannot read per-example norms from layer hooks here: "
                         f"{'; '.join(reasons)}. Use engine='vmap' (or 'auto', which picks it).")
    return "vmap", reasons


def log_metrics(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` to every logger of ``trainer``, on global rank 0 only (the other ranks' values
    are the same, or are their own shard's, which a multi-rank log would mix in)."""
    if metrics and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)
