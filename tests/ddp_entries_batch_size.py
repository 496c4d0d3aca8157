"""2-process DDP entries for tests/test_batch_size_schedule.py (one job, two fits: schedule, then adaptive)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_sgd.plugins import AdaptiveBatchSize, BatchSizeSchedule
from tests.ddp import ddp_trainer_kwargs, dump
from tests.helpers import TinyDataModule, tiny_module


class _Sizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.epoch0_rows: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(int(batch[0].shape[0]))
        if trainer.current_epoch == 0:
            self.epoch0_rows += [round(float(v), 6) for v in batch[0][:, 0]]


class _RankGNS(pl.Callback):
    """B_simple 40 on rank 0, 1000 on rank 1: only rank 0's value may decide (a settled estimate on both)."""

    grad_sq_norm, measured = 1.0, 100

    def __init__(self) -> None:
        self.rank = 0

    def setup(self, trainer, pl_module, stage) -> None:
        self.rank = trainer.global_rank

    @property
    def b_simple(self) -> float:
        return 40.0 if self.rank == 0 else 1000.0


def schedule_and_adaptive(outdir) -> None:
    torch.manual_seed(0)
    sizes = _Sizes()
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=7, callbacks=[
        BatchSizeSchedule([2], factors=2, interval="step", lr_rule="linear"), sizes]))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=4, shuffle=True))
    adaptive_sizes = _Sizes()
    controller = AdaptiveBatchSize(max_batch_size=256, every_n_steps=2, start_step=2, max_growth=8.0)
    trainer2 = pl.Trainer(**ddp_trainer_kwargs(max_steps=4, callbacks=[_RankGNS(), controller, adaptive_sizes]))
    trainer2.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=4, shuffle=True))
    dump(outdir, trainer.global_rank, {"schedule_sizes": sizes.sizes, "epoch0_rows": sizes.epoch0_rows,
                                       "adaptive_sizes": adaptive_sizes.sizes,
                                       "adaptive_global": controller.global_batch_size(trainer2)})
