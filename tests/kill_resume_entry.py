"""A real training process for tests/test_kill_resume.py: the MNIST-1D recipe (small) with every measurement callback
and EMA, checkpointing every few steps; run as ``python -m tests.kill_resume_entry ROOT MAX_STEPS [CKPT|-]``
(``DEVICES=2`` in the environment: 2-process CPU DDP, Lightning launching the second process).

With ``SLOW_AFTER=<step>`` in the environment each step after that one sleeps 0.3 s, so the test can kill the process
while it trains (sleeping changes no number)."""

from __future__ import annotations

import os
import sys
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_sgd.callbacks import CurvatureSpectrum, GradientDiversity, GradientNoiseScale
from lightning_sgd.plugins import EMAWeights
from lightning_sgd.recipes import MNIST1DCNN, ClassificationModule, MNIST1DDataModule


class Slow(pl.Callback):
    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.after:
            time.sleep(0.3)


def main(root: str, max_steps: int, ckpt: str | None, devices: int = 1) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = ClassificationModule(MNIST1DCNN(channels=8), num_classes=10,
                                 optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    data = MNIST1DDataModule(num_train=1000, num_val=200, num_test=200, batch_size=100, seed=0,
                             cache_dir=os.path.join(root, "cache"))
    callbacks = [GradientNoiseScale(schedule=5, b_noise_schedule=7), GradientDiversity(schedule=10, probe_size=100),
                 CurvatureSpectrum(schedule=10, k=2, trace_matvecs=6, probe_batch_size=100), EMAWeights(decay=0.9),
                 ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=5, save_top_k=-1,
                                 filename="{step}")]
    if os.environ.get("SLOW_AFTER"):
        callbacks.append(Slow(int(os.environ["SLOW_AFTER"])))
    ddp = {"devices": devices, "strategy": "ddp"} if devices > 1 else {}
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=CSVLogger(root, name="csv"), **ddp,
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    if trainer.is_global_zero:
        torch.save({"weights": model.state_dict(), "raw": callbacks[3].raw_state_dict()},
                   os.path.join(root, "final.pt"))


if __name__ == "__main__":
    ckpt_arg = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    main(sys.argv[1], int(sys.argv[2]), ckpt_arg, int(os.environ.get("DEVICES", "1")))
