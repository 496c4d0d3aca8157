"""2-process DDP entry points for the noise-scale tests (run through tests.ddp.run_ddp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from tests.ddp import ddp_trainer_kwargs, dump
from tests.helpers import TinyDataModule, tiny_module


class StepRecorder(Callback):
    """Per optimizer step: the parameters, this rank's micro-batches and the noise-scale callback's raw sample.

    Must come after the GradientNoiseScale callback in the list (callbacks run in list order)."""

    def __init__(self, gns: Any) -> None:
        self.gns = gns
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.steps or self.steps[-1]["step"] != trainer.global_step:
            self.steps.append({"step": trainer.global_step, "batches": []})
        x, y = batch
        self.steps[-1]["batches"].append([x.tolist(), y.tolist()])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        entry = self.steps[-1]
        entry["params"] = [p.detach().flatten().tolist() for p in pl_module.parameters()]
        s = self.gns.last_sample
        entry["sample"] = None if s is None else [s.grad_sq_norm, s.trace_cov, s.b_small, s.b_big]
        self.gns.last_sample = None


def gns_ddp(outdir: Path, configs: list[list[Any]], max_steps: int = 3) -> None:
    """``configs``: ``[accumulate_grad_batches, use GradStatsDDPStrategy]`` pairs, or ``[accumulate, False,
    "bucket_view"]`` for plain DDP with ``gradient_as_bucket_view=True``; run one after another."""
    from pytorch_lightning.strategies import DDPStrategy

    from lightning_sgd.callbacks import GradientNoiseScale
    from lightning_sgd.gns_sources import StrategyRecordSource
    from lightning_sgd.plugins.grad_stats_ddp import GradStatsDDPStrategy

    results = {}
    rank = 0
    for accumulate, record, *variant in configs:
        pl.seed_everything(0)
        gns = GradientNoiseScale(source="ddp", schedule=1)
        recorder = StepRecorder(gns)
        extra = {"strategy": GradStatsDDPStrategy(log_grad_norms=False)} if record else {}
        if variant == ["bucket_view"]:
            extra = {"strategy": DDPStrategy(gradient_as_bucket_view=True)}
        trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=max_steps, accumulate_grad_batches=accumulate,
                                                  callbacks=[gns, recorder], **extra))
        trainer.fit(tiny_module(lr=0.5), datamodule=TinyDataModule(n=64, batch_size=4))
        rank = trainer.global_rank
        results["-".join([str(accumulate), str(int(record)), *variant])] = {
            "steps": recorder.steps, "b_simple": gns.b_simple, "measured": gns.measured,
            "used_record": isinstance(gns.active_source, StrategyRecordSource),
            "differencing": getattr(gns.active_source, "differencing", False)}
    dump(outdir, rank, results)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
