"""DDP entry functions for the GradStatsDDPStrategy tests (see tests.ddp; each job runs several short fits)."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from lightning_sgd.plugins.grad_stats_ddp import GradStatsDDPStrategy
from tests.ddp import ddp_trainer_kwargs, dump
from tests.helpers import TinyDataModule, classification_data, tiny_module


def _flat_grad(module: pl.LightningModule) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in module.parameters()])


class _Probe(pl.Callback):
    """Per micro-batch: this rank's local mean-loss gradient computed by hand (torch.autograd.grad, no DDP).
    Per optimizer step: the all-reduced ``.grad`` and the strategy's published stats."""

    def __init__(self, autocast: torch.dtype | None) -> None:
        self.autocast = autocast
        self.micro: list[list[float]] = []
        self.steps: list[dict[str, Any]] = []
        self.recorder = ""  # which measuring path the strategy runs (its recorder's class)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.recorder = type(trainer.strategy._recorder).__name__
        inputs, targets = pl_module.split_batch(batch)
        ctx = torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = pl_module.loss(pl_module(inputs), targets)
        grads = torch.autograd.grad(loss, list(pl_module.parameters()))
        self.micro.append(torch.cat([g.flatten().double() for g in grads]).tolist())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = trainer.strategy.latest_grad_stats
        self.steps.append({
            "step": trainer.global_step, "stats_step": stats.step,
            "local_sq_norms": stats.local_sq_norms.tolist(), "global_sq_norm": stats.global_sq_norm,
            "local_batch_size": stats.local_batch_size, "global_batch_size": stats.global_batch_size,
            "reduced_grad": _flat_grad(pl_module).tolist(),
        })


def _strategy(config: str) -> GradStatsDDPStrategy:
    if config == "fp16_hook":
        return GradStatsDDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook)
    if config == "powersgd":
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=1,
                                       use_error_feedback=False, warm_start=False)
        return GradStatsDDPStrategy(ddp_comm_state=state, ddp_comm_hook=powersgd.powerSGD_hook)
    if config == "every2":
        return GradStatsDDPStrategy(every_n_steps=2)
    if config == "static_graph":  # DDP delays the first iteration's all-reduce to its end-of-backward callback
        return GradStatsDDPStrategy(static_graph=True, bucket_cap_mb=1e-4)
    if config == "bucket_view":  # .grad is the bucket: the comm-hook path (tiny buckets: one per parameter, so
        # the per-bucket sums and the separate all-reduce of the local norms with the last bucket are exercised)
        return GradStatsDDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=1e-4)
    # DDP's own all-reduce, norms from .grad at the end of backward; tiny buckets: one bucket per parameter
    return GradStatsDDPStrategy(bucket_cap_mb=1e-4)


def norms_by_hand(outdir: Path, configs: list[str], steps: int = 2, batch_size: int = 8) -> None:
    """One short fit per config; each rank dumps its hand-computed gradients and what the strategy published."""
    results: dict[str, Any] = {}
    for config in configs:
        pl.seed_everything(0)
        probe = _Probe(autocast={"bf16": torch.bfloat16, "fp16_scaler": torch.float16}.get(config))
        extra: dict[str, Any] = {}
        if config in ("accumulate", "every2"):
            extra["accumulate_grad_batches"] = 2
        if config == "bf16":
            extra["precision"] = "bf16-mixed"
        if config == "fp16_scaler":  # fp16 autocast with a loss scaler, as on CUDA, here on CPU
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
            extra["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        if config == "plain":  # the strategy's own metrics, through the LightningModule's logger
            extra.update(logger=CSVLogger(outdir, name="plain", version=0), log_every_n_steps=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps + (config == "every2"), callbacks=[probe],
                                                      strategy=_strategy(config), **extra))
            trainer.fit(tiny_module(), datamodule=TinyDataModule(n=128, batch_size=batch_size))
        results[config] = {
            "micro": probe.micro, "steps": probe.steps,
            "warnings": [str(w.message) for w in caught if "GradStatsDDPStrategy" in str(w.message)],
            "recorder": probe.recorder,
        }
    dump(outdir, int(os.environ.get("RANK", trainer.global_rank)), results)


class _GNSProbe(pl.Callback):
    """After GradientNoiseScale (listed later, so it runs later): its per-step sample and each rank's batch sum."""

    def __init__(self, gns: Any) -> None:
        self.gns = gns
        self.samples: list[list[float]] = []
        self.batch_sums: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_sums.append(float(batch[0].double().sum()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        sample = self.gns.last_sample
        self.samples.append([sample.grad_sq_norm, sample.trace_cov, sample.b_small, sample.b_big])


def gns_from_strategy(outdir: Path, steps: int, batch_size: int, beta: float) -> None:
    """lr = 0 (fixed parameters), fresh examples every step: GradientNoiseScale(source="ddp") on the record."""
    from lightning_sgd.callbacks import GradientNoiseScale

    pl.seed_everything(0)
    gns = GradientNoiseScale(source="ddp", beta=beta)
    probe = _GNSProbe(gns)
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[gns, probe],
                                              strategy=GradStatsDDPStrategy(log_grad_norms=False)))
    world = trainer.world_size
    trainer.fit(tiny_module(lr=0.0), datamodule=TinyDataModule(n=steps * batch_size * world, batch_size=batch_size))
    dump(outdir, trainer.global_rank, {"samples": probe.samples, "batch_sums": probe.batch_sums,
                                       "b_simple": gns.b_simple, "measured": gns.measured})


class _FreshTinyData(TinyDataModule):
    """TinyDataModule plus the fresh-sample protocol (DeepBootstrap): new draws from the same teacher."""

    def __init__(self, n: int, batch_size: int) -> None:
        super().__init__(n=n, batch_size=batch_size)
        self._pool_x, self._pool_y = classification_data(4 * n, seed=0)  # same teacher; examples past n are fresh

    def fresh_batch(self, start: int, size: int):
        stop = self.x.shape[0] + start + size
        if stop > self._pool_x.shape[0]:
            raise IndexError("fresh stream exhausted")
        return self._pool_x[stop - size:stop], self._pool_y[stop - size:stop]


class _GhostProbe(pl.Callback):
    """Each step: this rank's local gradient by hand on a copy of the network (same ghost-BN forward as training)
    and the strategy's record next to the all-reduced ``.grad``."""

    def __init__(self) -> None:
        self.local: list[list[float]] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = copy.deepcopy(pl_module.network)  # train mode: ghost-BN batch statistics, buffers of the copy only
        inputs, targets = pl_module.split_batch(batch)
        grads = torch.autograd.grad(pl_module.loss(net(inputs), targets), list(net.parameters()))
        self.local.append(torch.cat([g.flatten().double() for g in grads]).tolist())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = trainer.strategy.latest_grad_stats
        self.steps.append({"stats_step": stats.step, "step": trainer.global_step,
                           "local_sq_norms": stats.local_sq_norms.tolist(), "global_sq_norm": stats.global_sq_norm,
                           "reduced_grad": _flat_grad(pl_module).tolist()})


def plugins_and_callbacks(outdir: Path, steps: int = 4) -> None:
    """Ghost BN, EMA weights and the measurement callbacks together under GradStatsDDPStrategy (one fit)."""
    from lightning_sgd.callbacks import CurvatureSpectrum, DeepBootstrap, GradientDiversity, GradientNoiseScale
    from lightning_sgd.plugins import EMAWeights, GhostBatchNorm, GhostBatchNormCallback
    from lightning_sgd.recipes.classification import ClassificationModule

    pl.seed_everything(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(25, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    module = ClassificationModule(net, num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    probe = _GhostProbe()
    gns, diversity = GradientNoiseScale(), GradientDiversity(schedule=1)
    curvature = CurvatureSpectrum(schedule=2, k=2, lanczos_iterations=10, trace_matvecs=3, probe_batch_size=8)
    bootstrap = DeepBootstrap(schedule=2, plot=False, max_train_eval_examples=32)
    callbacks = [GhostBatchNormCallback(4), EMAWeights(decay=0.5), probe, gns, diversity, curvature, bootstrap]
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=callbacks, strategy=GradStatsDDPStrategy()))
    trainer.fit(module, datamodule=_FreshTinyData(n=64, batch_size=8))
    dump(outdir, trainer.global_rank, {
        "ghost": isinstance(module.network[1], GhostBatchNorm),
        "local": probe.local, "steps": probe.steps,
        "final_weights": torch.nn.utils.parameters_to_vector(module.parameters()).tolist(),  # EMA copied in at end
        "gns_measured": gns.measured, "gns_b_simple": gns.b_simple,
        "diversity": diversity.last_metrics,
        "curvature": [{k: v for k, v in h.items() if isinstance(v, (int, float, list))} for h in curvature.history],
        "bootstrap": bootstrap.history,
    })


def two_nodes(outdir: Path, steps: int = 2) -> None:
    """Launched by torchrun on 2 "nodes" × 1 process (scripts/two_node_loopback.sh): Lightning reads the torchrun
    environment (TorchElasticEnvironment) and runs across the two agents."""
    pl.seed_everything(0)
    probe = _Probe(autocast=None)
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, devices=1, num_nodes=2, callbacks=[probe],
                                              strategy=GradStatsDDPStrategy()))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=8))
    dump(outdir, trainer.global_rank, {
        "micro": probe.micro, "steps": probe.steps, "world": trainer.world_size, "node_rank": trainer.node_rank,
        "environment": type(trainer.strategy.cluster_environment).__name__,
    })
