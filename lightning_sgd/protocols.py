"""The contract between measurement callbacks and the user's LightningModule.

Per-example gradients, curvature operators and the bootstrap twin all need to run the model's forward pass and
loss outside ``training_step``. A module supports them by implementing three small methods:

- ``split_batch(batch) -> (inputs, targets)``: what ``forward`` takes and what the loss compares against.
- ``forward(inputs) -> outputs``.
- ``loss(outputs, targets) -> Tensor``: the scalar training loss, a *mean* over the examples of the batch, so that
  the loss of a batch of one example is that example's loss.

Every recipe module implements them (see :class:`lightning_sgd.recipes.ClassificationModule`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class SupervisedModule(Protocol):
    """A module whose loss is a mean of per-example losses over ``(inputs, targets)`` batches."""

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]: ...

    def forward(self, inputs: Any) -> Tensor: ...

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor: ...


def require_supervised(module: torch.nn.Module, who: str) -> SupervisedModule:
    """Return ``module`` if it implements :class:`SupervisedModule`, else raise a ``TypeError`` saying how to fix it."""
    missing = [name for name in ("split_batch", "forward", "loss") if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"{who} needs the LightningModule to implement {', '.join(missing)}: "
            "`split_batch(batch) -> (inputs, targets)`, `forward(inputs) -> outputs` and "
            "`loss(outputs, targets) -> scalar mean loss` (see lightning_sgd.protocols). "
            f"{type(module).__name__} is missing them; subclass lightning_sgd.recipes.ClassificationModule "
            "or add these methods."
        )
    return module  # type: ignore[return-value]
