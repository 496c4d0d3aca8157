"""DDP entry function for the training-plugin tests (see tests.ddp): ghost BN, EMA and LR scaling under 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_sgd.plugins import EMAWeights, GhostBatchNormCallback, LRWarmupScaling
from lightning_sgd.recipes.classification import ClassificationModule
from tests.ddp import ddp_trainer_kwargs, dump
from tests.helpers import TinyDataModule


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def plugins_under_ddp(outdir: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(25, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    module = ClassificationModule(net, num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    ema = EMAWeights(half_life_samples=64)
    recorder = _RecordLR()
    callbacks = [GhostBatchNormCallback(4), ema, LRWarmupScaling(reference_batch_size=8, warmup_steps=2), recorder]
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=3, accumulate_grad_batches=2, callbacks=callbacks))
    trainer.fit(module, datamodule=TinyDataModule(n=64, batch_size=8))
    bn = module.network[1]
    dump(outdir, trainer.global_rank, {
        "ghost": type(bn).__name__,
        "num_batches_tracked": int(bn.num_batches_tracked),
        "ema_weights": torch.nn.utils.parameters_to_vector(module.parameters()).tolist(),
        "last_decay": ema.last_decay,
        "num_updates": ema.num_updates,
        "scale": callbacks[2].scale,
        "lrs": recorder.lrs,
    })
