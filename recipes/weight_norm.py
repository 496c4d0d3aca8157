"""Channel-wise weight normalization by projection (Zhang et al. 2019 App. F.2, after Zhang et al. 2019b and
van Laarhoven 2017): every output channel of every convolution keeps unit Frobenius norm, instead of weight decay.

A convolution followed by batch norm is invariant to the scale of its weights, so weight decay only acts through
the weight norm, i.e. the effective learning rate η/‖w‖². Fixing ‖w_c‖ = 1 per output channel fixes that effective
learning rate. The constraint is enforced by projecting ``w_c ← w_c / ‖w_c‖_F`` once before training and after
every optimizer step (an optimizer step post-hook, so it holds with gradient accumulation, AMP and any optimizer),
and the parameters stay ordinary tensors (per-example gradients and curvature callbacks see a plain model).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override


def conv_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of every ``nn.Conv{1,2,3}d`` of ``module``."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]


@torch.no_grad()
def normalize_channels_(weights: list[torch.Tensor], norm: float = 1.0, eps: float = 1e-12) -> None:
    """In place: scale each output channel ``w[c]`` of each weight to Frobenius norm ``norm``."""
    for w in weights:
        flat = w.view(w.shape[0], -1)
        flat.mul_(norm / flat.norm(dim=1, keepdim=True).clamp_min(eps))


class ChannelWeightNorm(pl.Callback):
    """Keep every convolution output channel at Frobenius norm ``norm`` (1 in the sources) throughout training.

    Add to ``trainer.callbacks`` (YAML ``class_path: lightning_sgd.recipes.ChannelWeightNorm``) and set the
    optimizer's ``weight_decay`` to 0.

    Args:
        norm: the fixed per-channel norm.
    """

    def __init__(self, norm: float = 1.0) -> None:
        if norm <= 0:
            raise MisconfigurationException(f"ChannelWeightNorm: norm must be > 0, got {norm}.")
        self.norm = norm
        self._handles: list[Any] = []
        self._weights: list[nn.Parameter] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._weights = conv_weights(pl_module)
        if not self._weights:
            raise MisconfigurationException("ChannelWeightNorm: the model has no convolution to normalize.")
        normalize_channels_(self._weights, self.norm)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._project))

    def _project(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        normalize_channels_(self._weights, self.norm)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
