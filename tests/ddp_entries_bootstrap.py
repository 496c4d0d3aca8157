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
    dump(outdir, trainer.global_rank, {"twin": twin.tolist(), "fresh_pos": cb.fresh_position, "steps": cb.twin_steps,
                                       "history": cb.history})


def _stopping_fit(outdir: Path, dm: pl.LightningDataModule, steps: int, schedule: int) -> None:
    """A 2-rank fit whose twin stops on one rank's say; each rank reports what its twin did. The process group's
    30 s timeout turns a rank left waiting in a collective into an error instead of a hang."""
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    from tests.test_deep_bootstrap import mlp_module

    pl.seed_everything(0)
    cb = DeepBootstrap(schedule=schedule, plot=False)
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[cb],
                                              strategy=DDPStrategy(timeout=timedelta(seconds=30))))
    trainer.fit(mlp_module(), datamodule=dm)
    twin = torch.cat([p.detach().flatten() for p in cb.twin.parameters()])
    dump(outdir, trainer.global_rank, {
        "stopped": cb.stopped, "twin_steps": cb.twin_steps, "fresh_pos": cb.fresh_position,
        "global_step": trainer.global_step, "twin": twin.tolist(), "measured": [h["step"] for h in cb.history],
        "ideal": [h["step"] for h in cb.history if "bootstrap/ideal_test_loss" in h]})


def pool_runs_out_on_one_rank(outdir: Path, steps: int = 6) -> None:
    """A pool of 40 at 8 per rank: step 2's share of rank 0 (examples 32-39) exists, rank 1's (40-47) does not."""
    from tests.test_deep_bootstrap import PoolData

    _stopping_fit(outdir, PoolData(n_train=128, pool=40, batch_size=8), steps, schedule=1)


def eval_diverges_on_rank_zero(outdir: Path, steps: int = 8) -> None:
    """The evaluation set turns non-finite from its 5th pass: rank 0 (which alone evaluates) finds the twin's test
    loss non-finite at the measurement of step 4 while rank 1's twin trains on."""
    from tests.test_deep_bootstrap import EvalTurnsInf

    _stopping_fit(outdir, EvalTurnsInf(n_train=128, batch_size=8, finite_passes=4), steps, schedule=2)


def dropin_under_lightning(outdir: Path, steps: int = 4, per_rank_batch: int = 8) -> None:
    """DeepBootstrap and EMAWeights(validate='both') on the README autoencoder (no protocol) under
    ``lightning.Trainer`` on 2 ranks; each rank reports its twin, the EMA weights fit leaves and val_ema/loss."""
    import lightning.pytorch as L

    from lightning_sgd.plugins import EMAWeights
    from tests.test_plugins_dropin import DATA, make

    L.seed_everything(0)
    boot, ema = DeepBootstrap(schedule=2, plot=False), EMAWeights(decay=0.5, validate="both")
    trainer = L.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[boot, ema], val_check_interval=steps,
                                             limit_val_batches=1.0))
    module = make("lightning", "autoencoder")
    trainer.fit(module, datamodule=DATA["lightning"]("autoencoder", n=64, batch_size=per_rank_batch))
    twin = torch.cat([p.detach().flatten() for p in boot.twin.parameters()])
    dump(outdir, trainer.global_rank, {
        "twin": twin.tolist(), "fresh_pos": boot.fresh_position, "history": boot.history,
        "ema_state": {k: v.tolist() for k, v in module.state_dict().items()},
        "val_ema_loss": float(trainer.callback_metrics["val_ema/loss"]), "num_updates": ema.num_updates})
