"""DDP entry functions for the DeepBootstrap tests (see tests.ddp)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_sgd.callbacks import DeepBootstrap
from tests.ddp import ddp_trainer_kwargs, dump


def bootstrap_twin(outdir: Path, steps: int = 4, per_rank_batch: int = 8) -> None:
    """Fit with DeepBootstrap on 2 ranks; each rank reports its twin's weights, stream position and history."""
    from tests.test_deep_bootstrap import TeacherData, mlp_module

    pl.seed_everything(0)
    cb = DeepBootstrap(schedule=2, plot=False)
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[cb]))
    trainer.fit(mlp_module(momentum=0.9), datamodule=TeacherData(n_train=128, batch_size=per_rank_batch))
    twin = torch.cat([p.detach().flatten() for p in cb.twin.parameters()])
    dump(outdir, trainer.global_rank, {"twin": twin.tolist(), "fresh_pos": cb._fresh_pos, "steps": cb._twin_steps,
                                       "history": cb.history})
