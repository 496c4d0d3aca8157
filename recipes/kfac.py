"""K-FAC (Martens & Grosse 2015) for the classification recipes, from the ASDL package (``pip install asdfghjkl``,
imported as ``asdl``; Osawa et al., https://github.com/kazukiosawa/asdl).

Zhang et al. (2019) compare SGD, momentum, Adam and K-FAC across batch sizes, with K-FAC's preconditioning applied
*before* momentum. :class:`KFACClassificationModule` does exactly that: ASDL's ``KfacGradientMaker`` runs forward
and backward, replaces every supported layer's (Linear, Conv2d) gradient by the K-FAC-preconditioned one, and then
the configured optimizer (e.g. ``torch.optim.SGD`` with ``momentum``) takes its step with that gradient.

Limits: manual optimization on a single process (the gradient maker calls the network outside DDP's forward), and
no AMP / gradient accumulation. Measurement callbacks that recompute gradients (GradientNoiseScale with the
per-example or split source, CurvatureSpectrum) work; those reading gradients in automatic-optimization hooks do not.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_sgd.recipes.classification import ClassificationModule


class _NoNVTX:
    """Stand-in for ``torch.cuda.nvtx`` on CPU-only torch builds, where its ``range`` raises."""

    @staticmethod
    def range(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _import_asdl() -> Any:
    try:
        asdl = importlib.import_module("asdl")
    except ImportError as err:
        raise ImportError("KFACClassificationModule needs ASDL: pip install asdfghjkl") from err
    if not torch.cuda.is_available():  # ASDL 0.1a5 marks regions with NVTX ranges at run time, even on CPU
        for name in ("asdl.precondition.natural_gradient", "asdl.operations.operation"):
            module = importlib.import_module(name)
            if getattr(module, "nvtx", None) is torch.cuda.nvtx:
                module.nvtx = _NoNVTX
    return asdl


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


class KFACClassificationModule(ClassificationModule):
    """:class:`~lightning_sgd.recipes.ClassificationModule` trained with K-FAC-preconditioned gradients.

    Args:
        network, num_classes, optimizer, lr_scheduler, label_smoothing: as ``ClassificationModule``; ``optimizer``
            receives the preconditioned gradient (use SGD with ``momentum`` for "K-FAC with momentum").
        damping: Tikhonov damping added to each Kronecker factor before inversion.
        ema_decay: exponential moving average of the Kronecker factors (``-1``: no averaging).
        curvature_update_interval: steps between curvature (Kronecker factor) updates.
        inverse_update_interval: steps between recomputing the factors' inverses.
        fisher_type: ``"fisher_mc"`` (true Fisher, one sampled label per example), ``"fisher_emp"`` (empirical) or
            ``"fisher_exact"``.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        damping: float = 1e-3,
        ema_decay: float = 0.95,
        curvature_update_interval: int = 1,
        inverse_update_interval: int = 10,
        fisher_type: str = "fisher_mc",
    ) -> None:
        super().__init__(network, num_classes, optimizer, lr_scheduler, "step", label_smoothing)
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}.")
        if curvature_update_interval < 1 or inverse_update_interval < 1:
            raise ValueError("curvature_update_interval and inverse_update_interval must be >= 1.")
        if fisher_type not in ("fisher_mc", "fisher_emp", "fisher_exact"):
            raise ValueError(f"fisher_type must be fisher_mc, fisher_emp or fisher_exact, got {fisher_type!r}.")
        self.automatic_optimization = False
        self.damping, self.ema_decay, self.fisher_type = damping, ema_decay, fisher_type
        self.curvature_update_interval = curvature_update_interval
        self.inverse_update_interval = inverse_update_interval
        self._gradient_maker: Any = None

    def on_fit_start(self) -> None:
        self._gradient_maker = None  # built on the first batch: ASDL scales the Fisher by the batch size
        if self.trainer.world_size > 1:
            raise RuntimeError("KFACClassificationModule runs on a single process (ASDL's gradient maker bypasses "
                               "DDP's forward); use devices=1.")
        _import_asdl()

    def _make_gradient_maker(self, batch_size: int) -> Any:
        asdl = _import_asdl()
        config = asdl.PreconditioningConfig(
            data_size=batch_size, damping=self.damping, ema_decay=self.ema_decay,
            curvature_upd_interval=self.curvature_update_interval,
            preconditioner_upd_interval=self.inverse_update_interval,
        )
        return asdl.KfacGradientMaker(self.network, config, fisher_type=self.fisher_type, loss_type="cross_entropy")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        inputs, targets = self.split_batch(batch)
        optimizer.zero_grad()
        if self._gradient_maker is None:
            self._gradient_maker = self._make_gradient_maker(targets.shape[0])
        maker = self._gradient_maker
        maker.config.data_size = targets.shape[0]
        dummy_logits = maker.setup_model_call(self.network, inputs)
        maker.setup_loss_call(self.criterion, dummy_logits, targets)
        logits, loss = maker.forward_and_backward()  # .grad now holds the K-FAC-preconditioned gradient
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        loss = loss.detach()
        self.accuracy["train_acc"](logits.detach(), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=targets.shape[0], sync_dist=True)
        self.log("train/acc", self.accuracy["train_acc"], on_step=True, on_epoch=True, batch_size=targets.shape[0])
        return loss
