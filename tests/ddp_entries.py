"""DDP entry functions for the foundation tests (see tests.ddp)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from tests.ddp import ddp_trainer_kwargs, dump
from tests.helpers import TinyDataModule, tiny_module


def fit_tiny(outdir: Path, steps: int = 3) -> None:
    """Fit the tiny module on 2 ranks; each rank reports its parameter vector and the data it saw."""
    pl.seed_everything(0)
    module = tiny_module()
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(float(batch[0].sum()))

    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[Record()]))
    trainer.fit(module, datamodule=TinyDataModule(batch_size=8))
    params = torch.cat([p.detach().flatten() for p in module.parameters()])
    dump(outdir, trainer.global_rank, {"params": params.tolist(), "seen": seen, "world": trainer.world_size})
