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
from torch.utils._pytree import tree_flatten, tree_map


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


def first_tensor(tree: Any) -> Tensor | None:
    """The first tensor in a (possibly nested) batch, or ``None`` if it holds none."""
    return next((leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)), None)


def num_examples(module: torch.nn.Module, batch: Any, who: str) -> int:
    """Examples in ``batch``: dim 0 of the first tensor of the module's inputs (of the whole batch when the module
    has no ``split_batch``). Raises a ``TypeError`` naming ``who`` when there is no tensor to read it from."""
    split = getattr(module, "split_batch", None)
    tensor = first_tensor(split(batch)[0] if callable(split) else batch)
    if tensor is None:
        raise TypeError(f"{who}: cannot find a tensor in the batch to read its batch size from.")
    return int(tensor.shape[0])


def slice_examples(tree: Any, part: slice) -> Any:
    """The examples ``part`` of every tensor in a (possibly nested) batch; other leaves are kept as they are."""
    return tree_map(lambda t: t[part] if isinstance(t, Tensor) else t, tree)
