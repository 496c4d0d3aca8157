"""DDP entry function for tests/test_lightning_packages.py: the gradient-statistics strategy under either package."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from lightning_sgd.compat import Callback
from tests.ddp import ddp_trainer_kwargs, dump


class _Probe(Callback):
    """Per step: this rank's mean-loss gradient by hand (torch.autograd.grad of the module's loss on the batch, no
    DDP) next to the strategy's record and the all-reduced ``.grad`` the optimizer sees."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._local: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        loss = pl_module.loss_of(batch)
        grads = torch.autograd.grad(loss, list(pl_module.parameters()))
        self._local = torch.cat([g.flatten().double() for g in grads]).tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = trainer.strategy.latest_grad_stats
        self.steps.append({
            "step": trainer.global_step, "stats_step": stats.step, "local": self._local,
            "local_sq_norms": stats.local_sq_norms.tolist(), "global_sq_norm": stats.global_sq_norm,
            "local_batch_size": stats.local_batch_size, "global_batch_size": stats.global_batch_size,
            "reduced_grad": torch.cat([p.grad.flatten().double() for p in pl_module.parameters()]).tolist(),
        })


def grad_stats_fits(outdir: Path, package: str, steps: int = 2) -> None:
    """Two short fits under ``package``'s Trainer: ``strategy="ddp_grad_stats"`` and the strategy object."""
    from lightning_sgd.plugins.grad_stats_ddp import grad_stats_ddp_strategy
    from tests.test_lightning_packages import boring_data, boring_module

    lightning = importlib.import_module(package)
    results: dict[str, Any] = {}
    for form, strategy in (("name", "ddp_grad_stats"), ("object", grad_stats_ddp_strategy(package))):
        lightning.seed_everything(0)
        probe = _Probe()
        trainer = lightning.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[probe], strategy=strategy))
        trainer.fit(boring_module(package), train_dataloaders=boring_data(n=64, batch_size=8))
        results[form] = {"steps": probe.steps, "strategy": type(trainer.strategy).__name__,
                         "ddp_base": next(c.__module__ for c in type(trainer.strategy).__mro__
                                          if c.__name__ == "DDPStrategy")}
    dump(outdir, int(os.environ.get("RANK", trainer.global_rank)), results)
