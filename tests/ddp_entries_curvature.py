"""DDP entry functions for the CurvatureSpectrum tests (see tests.ddp)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from lightning_sgd.callbacks import CurvatureSpectrum
from tests.ddp import ddp_trainer_kwargs, dump
from tests.helpers import TinyDataModule, tiny_module


def measure_at_start(outdir: Path, k: int = 2, probe_batch_size: int = 8) -> None:
    """Measure the Hessian and GGN before the first step on 2 ranks; report numbers, probe data and weights."""
    pl.seed_everything(0)
    module = tiny_module()
    params = [p.detach().clone().flatten().tolist() for p in module.parameters()]
    callbacks = [
        CurvatureSpectrum(schedule=10_000, operator=op, k=k, lanczos_iterations=30, trace_matvecs=9,
                          probe_batches=2, probe_batch_size=probe_batch_size, at_fit_end=False)
        for op in ("hessian", "ggn")
    ]
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=1, callbacks=callbacks))
    trainer.fit(module, datamodule=TinyDataModule(batch_size=8))
    hessian, ggn = callbacks
    dump(outdir, trainer.global_rank, {
        "params": params,
        "probe": [[b[0].tolist(), b[1].tolist()] for b in hessian.probe],
        "hessian": hessian.history[0],
        "ggn": ggn.history[0],
        "world": trainer.world_size,
    })
