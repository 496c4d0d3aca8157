"""A classification LightningModule that takes its network, optimizer and LR scheduler from the config."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification of ``(inputs, labels)`` batches with any network.

    Implements the :mod:`lightning_sgd.protocols` contract (``split_batch``, ``forward``, ``loss``), so every
    measurement callback works with it. Logs ``{train,val,test}/loss`` and ``{train,val,test}/acc``.

    Args:
        network: the model mapping inputs to logits of shape ``(B, num_classes)``.
        num_classes: number of classes (for accuracy).
        optimizer: optimizer factory, e.g. YAML ``optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}``.
        lr_scheduler: optional LR scheduler factory; stepped every ``scheduler_interval``.
        scheduler_interval: ``"step"`` (every optimizer step, as the sources' schedules) or ``"epoch"``.
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}.")
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler"])
        self.network = network
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.accuracy = nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro")
                for stage in ("train", "val", "test")
            }
        )

    # ----------------------------------------------------------------------- the lightning_sgd.protocols contract
    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        return inputs, targets

    def forward(self, inputs: Tensor) -> Tensor:
        return self.network(inputs)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.criterion(outputs, targets)

    # -------------------------------------------------------------------------------------------------- steps
    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = self.split_batch(batch)
        logits = self(inputs)
        loss = self.loss(logits, targets)
        accuracy = self.accuracy[f"{stage}_acc"]  # ModuleDict keys cannot shadow Module.train
        accuracy(logits.detach(), targets)
        on_step = stage == "train"
        # sync_dist: under DDP each rank sees one shard; the logged loss is the mean over ranks (the accuracy is a
        # torchmetrics Metric, which gathers its counts across ranks itself)
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train",
                 batch_size=targets.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=stage != "train",
                 batch_size=targets.shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
