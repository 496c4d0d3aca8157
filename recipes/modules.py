"""LightningModules for the non-classification workloads: language models and the auto-encoder.

Both implement the :mod:`lightning_sgd.protocols` contract (``split_batch``, ``forward``, ``loss`` with the loss a
mean of per-example losses), so every measurement callback works with them, and take their optimizer and per-step
LR schedule from the config exactly as :class:`lightning_sgd.recipes.ClassificationModule` does.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


class _ConfiguredOptimizer(pl.LightningModule):
    """Shared ``configure_optimizers`` (optimizer factory + optional LR scheduler stepped every optimizer step) and
    the train/val/test steps, which all run the subclass's ``_step(batch, stage)``."""

    optimizer_factory: OptimizerCallable
    lr_scheduler_factory: LRSchedulerCallable | None

    def _step(self, batch: Any, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        return inputs, targets


class LanguageModelModule(_ConfiguredOptimizer):
    """Next-token prediction on ``(inputs (B, T), targets (B, T))`` batches with any network giving ``(B, T, V)``.

    The loss is the token cross-entropy averaged over each example's ``T`` tokens, then over the examples (with the
    fixed-length windows of the recipes' data modules this is the mean over all tokens). Logs
    ``{train,val,test}/loss`` (nats per token) and ``{val,test}/ppl``.
    """

    def __init__(self, network: nn.Module, optimizer: OptimizerCallable = _default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler"])
        self.network = network
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def setup(self, stage: str) -> None:
        # the datamodule's setup has run by now (Lightning calls it before the module's): check the vocabularies
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        model_vocab = getattr(self.network, "vocab_size", None)
        if data_vocab is not None and model_vocab is not None and data_vocab > model_vocab:
            raise ValueError(f"The data's vocabulary has {data_vocab} tokens but the network's vocab_size is "
                             f"{model_vocab}: set model.init_args.network.init_args.vocab_size >= {data_vocab}.")

    def forward(self, inputs: Tensor) -> Tensor:
        return self.network(inputs)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        # (B, T, V), (B, T) -> per-example mean over T -> mean over B
        per_token = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none")
        return per_token.view(targets.shape).mean(dim=-1).mean()

    def _step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = self.split_batch(batch)
        loss = self.loss(self(inputs), targets)
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=not train, batch_size=len(targets),
                 sync_dist=True)  # the mean over ranks under DDP, not one shard's
        if not train:
            self.log(f"{stage}/ppl", torch.exp(loss.detach()), on_epoch=True, batch_size=len(targets), sync_dist=True)
        return loss


class AutoencoderModule(_ConfiguredOptimizer):
    """Reconstruct the inputs: ``split_batch((x, label)) = (x, x.flatten(1))``; labels are ignored.

    Args:
        reconstruction: ``"bce"``: sigmoid cross-entropy against pixels in [0, 1] (Hinton & Salakhutdinov 2006,
            Martens 2010), or ``"mse"``: squared error of ``sigmoid(outputs)``; both summed over pixels per example
            and averaged over examples.
    """

    def __init__(self, network: nn.Module, optimizer: OptimizerCallable = _default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, reconstruction: str = "bce") -> None:
        super().__init__()
        if reconstruction not in ("bce", "mse"):
            raise ValueError(f"reconstruction must be 'bce' or 'mse', got {reconstruction!r}.")
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler"])
        self.network = network
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.reconstruction = reconstruction

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs = batch[0]
        return inputs, inputs.flatten(1)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.network(inputs)  # logits (B, D)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.reconstruction == "bce":
            per_pixel = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        else:
            per_pixel = (torch.sigmoid(outputs) - targets) ** 2
        return per_pixel.sum(dim=1).mean()

    def _step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = self.split_batch(batch)
        outputs = self(inputs)
        loss = self.loss(outputs, targets)
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=not train, batch_size=len(targets),
                 sync_dist=True)  # the mean over ranks under DDP, not one shard's
        if not train:
            mse = ((torch.sigmoid(outputs) - targets) ** 2).sum(dim=1).mean()
            self.log(f"{stage}/mse", mse, on_epoch=True, batch_size=len(targets), sync_dist=True)
        return loss


__all__ = ["AutoencoderModule", "LanguageModelModule"]
