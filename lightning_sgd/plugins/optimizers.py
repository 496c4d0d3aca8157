"""LARS and LAMB with biases and normalization parameters excluded from the trust ratio, selectable in YAML.

Both come from the maintained ``pytorch-optimizer`` package (``pytorch_optimizer.LARS``, ``pytorch_optimizer.Lamb``;
they run on torch 2.13). These subclasses only split the parameters into two groups before handing them over:

- tensors with ``ndim > 1`` (weight matrices, conv kernels): layer-wise trust ratio and weight decay;
- tensors with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales and shifts): no trust ratio (LAMB: ``adam=True``
  for that group, i.e. trust ratio 1) and no weight decay, as You et al. recommend.

The split is by shape because a LightningModule's ``configure_optimizers`` usually passes ``self.parameters()``
(no names). Given dict param groups, each group is split and keeps its own options. In a recipe YAML::

    model:
      init_args:
        optimizer:
          class_path: lightning_sgd.plugins.optimizers.LAMB
          init_args: {lr: 0.01, weight_decay: 0.01}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lightning_sgd._extras import require

pytorch_optimizer = require("pytorch_optimizer", "LARS and LAMB (lightning_sgd.plugins.optimizers)")

__all__ = ["LAMB", "LARS", "split_trust_ratio_groups"]


def split_trust_ratio_groups(params: Iterable[Any], excluded_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Split parameters (or dict param groups) into ``ndim > 1`` groups and ``ndim <= 1`` groups.

    The ``ndim <= 1`` groups get ``excluded_options`` on top of their own options; empty groups are dropped.
    """
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    result: list[dict[str, Any]] = []
    for group in groups:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        options = {k: v for k, v in group.items() if k != "params"}
        matrices = [p for p in tensors if p.ndim > 1]
        vectors = [p for p in tensors if p.ndim <= 1]
        if matrices:
            result.append({"params": matrices, **options})
        if vectors:
            result.append({"params": vectors, **options, **excluded_options})
    return result


class LARS(pytorch_optimizer.LARS):
    """``pytorch_optimizer.LARS`` (You et al. 2017) with biases and norm parameters in a group without weight decay.

    Trust ratio ``trust_coefficient * ||w|| / (||g|| + weight_decay ||w||)`` for ``ndim > 1`` tensors; plain SGD
    with momentum for the others. Same arguments as ``pytorch_optimizer.LARS``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9,
                 dampening: float = 0.0, trust_coefficient: float = 1e-3, nesterov: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(split_trust_ratio_groups(params, {"weight_decay": 0.0}), lr=lr, weight_decay=weight_decay,
                         momentum=momentum, dampening=dampening, trust_coefficient=trust_coefficient,
                         nesterov=nesterov, **kwargs)


class LAMB(pytorch_optimizer.Lamb):
    """``pytorch_optimizer.Lamb`` (You et al. 2020) with biases and norm parameters excluded from the trust ratio.

    The ``ndim <= 1`` group runs with ``adam=True`` (trust ratio 1) and ``weight_decay=0``. Same arguments as
    ``pytorch_optimizer.Lamb``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(split_trust_ratio_groups(params, {"adam": True, "weight_decay": 0.0}), lr=lr, betas=betas,
                         weight_decay=weight_decay, eps=eps, **kwargs)
