"""The optional three-method contract between measurement callbacks and a LightningModule.

Every callback works on a module that has only ``training_step`` and ``configure_optimizers``: the loss of a batch
comes from the module's own ``training_step`` (:mod:`lightning_sgd.module_loss`). A module may also implement

- ``split_batch(batch) -> (inputs, targets)``: what ``forward`` takes and what the loss compares against,
- ``forward(inputs) -> outputs``,
- ``loss(outputs, targets) -> Tensor``: the scalar training loss, a *mean* over the examples of the batch,

which the measurements then use instead of ``training_step`` (skipping whatever else it computes). Only the
generalized Gauss-Newton matrix (``CurvatureSpectrum(operator="ggn")``) *needs* them: it needs the network's outputs
separately from the loss. See README section "Use it with your own LightningModule".

Batches of any structure are counted and sliced by :mod:`lightning_sgd.batches`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_sgd.module_loss import PROTOCOL_HELP, ProtocolRequired, has_protocol


@runtime_checkable
class SupervisedModule(Protocol):
    """A module whose loss is a mean of per-example losses over ``(inputs, targets)`` batches."""

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]: ...

    def forward(self, inputs: Any) -> Tensor: ...

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor: ...


def require_supervised(module: torch.nn.Module, who: str) -> SupervisedModule:
    """Return ``module`` if it implements :class:`SupervisedModule`, else raise :class:`ProtocolRequired` saying how
    to add it. Only for features that need the network's outputs separately from the loss."""
    if not has_protocol(module):
        raise ProtocolRequired(f"{who} needs the network's outputs separately from the loss, which `training_step` "
                               f"does not expose; {type(module).__name__} does not implement them: {PROTOCOL_HELP}.")
    return module  # type: ignore[return-value]
