"""GradientNoiseScale overhead: step time with vs without the callback, same model and data, side by side.

Configurations run in rounds, each round in a rotated order (so a slow patch of a shared machine hits all of them
alike); within a round the median per-step process CPU time (one torch thread; see StepTimer) of each configuration
is divided by that of the matching no-callback run, and the median of these per-round ratios is reported:

- single device: per_example source measuring every step (the cost of one measured step) with each engine (layer
  hooks on the training backward, and vmap re-running the batch), split source every step, and the default settings
  (source auto -> per_example through the hooks, every 50 steps: the overall overhead);
- gradient accumulation (2 micro-batches): the accumulation source measuring every step;
- with ``--ddp``: a 2-process CPU DDP job comparing plain DDP, DDP + the callback's hook source, and
  GradStatsDDPStrategy + the callback (the record source), each measuring every step.

Model: the MNIST-1D recipe's CNN (or ``--model cnn-wide``: the same with 128 channels; ``--model mlp``), batch 100
(the recipe's), random MNIST-1D-shaped data.

    python benchmarks/gns_overhead.py            # ~1-2 min on 2 CPU cores
    python benchmarks/gns_overhead.py --ddp      # adds the 2-process DDP comparison
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.callbacks import GradientNoiseScale
from lightning_sgd.recipes import MNIST1DCNN, MNIST1DMLP, ClassificationModule

warnings.filterwarnings("ignore")


class StepTimer(pl.Callback):
    """CPU time of this process between consecutive optimizer steps (on_train_batch_start of the first micro-batch
    of each). CPU time, not wall time: on a machine shared with other jobs wall time mostly measures the others;
    with one torch thread the process's CPU time is the work done (waiting on another DDP rank costs none)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.times.append(time.process_time())

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.times[skip:], self.times[skip + 1:])]


def make_module(model: str) -> ClassificationModule:
    torch.manual_seed(0)
    net = {"cnn": MNIST1DCNN, "cnn-wide": lambda: MNIST1DCNN(channels=128), "mlp": MNIST1DMLP}[model]()
    return ClassificationModule(net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


def make_loader(batch_size: int, n: int = 4000) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g, drop_last=True)


def run(model: str, steps: int, accumulate: int, callback: GradientNoiseScale | None, batch: int = 100,
        **trainer_kwargs: Any) -> list[float]:
    timer = StepTimer()
    callbacks = [timer] + ([callback] if callback is not None else [])
    kwargs = dict(accelerator="cpu", devices=1, max_steps=steps + 1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0, accumulate_grad_batches=accumulate, callbacks=callbacks)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(make_module(model), make_loader(batch // accumulate))
    return timer.step_times(skip=5)


def single_device(model: str, steps: int, rounds: int) -> dict[str, float]:
    configs = {
        "none": (1, lambda: None),
        "per_example (hooks), every step": (1, lambda: GradientNoiseScale(source="per_example", schedule=1,
                                                                           engine="hooks")),
        "per_example (vmap), every step": (1, lambda: GradientNoiseScale(source="per_example", schedule=1,
                                                                          engine="vmap")),
        "split (4 parts), every step": (1, lambda: GradientNoiseScale(source="split", schedule=1)),
        "default (auto, every 50)": (1, lambda: GradientNoiseScale()),
        "none, accumulate 2": (2, lambda: None),
        "accumulation, every step": (2, lambda: GradientNoiseScale(source="accumulation", schedule=1)),
    }
    reference = {name: "none, accumulate 2" if accumulate > 1 else "none" for name, (accumulate, _) in configs.items()}
    rounds_out = []
    for r in range(rounds):
        times = {}
        for name in _rotated(list(configs), r):
            accumulate, factory = configs[name]
            times[name] = run(model, steps, accumulate, factory())
        medians = {name: statistics.median(t) for name, t in times.items()}
        # the default schedule's overall cost is the mean step time, not the median (1 in 50 steps is slow)
        medians["default (auto, every 50) [mean]"] = statistics.fmean(times["default (auto, every 50)"])
        medians["none [mean]"] = statistics.fmean(times["none"])
        rounds_out.append(medians)
    reference["default (auto, every 50) [mean]"] = reference["none [mean]"] = "none [mean]"
    return _summarize(rounds_out, reference)


def _rotated(names: list[str], r: int) -> list[str]:
    """Round r runs the configurations starting from the r-th: each one meets each position of the round (slow
    drifts of a shared machine hit every configuration alike)."""
    r %= len(names)
    return names[r:] + names[:r]


def _summarize(rounds: list[dict[str, float]],
               reference: dict[str, str]) -> dict[str, tuple[float, float, list[float]]]:
    """Per configuration: (median ms/step over rounds, median of the per-round ratios to its reference, the ratios).

    A ratio is taken within one round (same minute of machine time), so a machine that is slower in one round than
    in another does not show up as overhead."""
    out = {}
    for name in rounds[0]:
        ratios = [r[name] / r[reference[name]] for r in rounds]
        out[name] = (statistics.median(r[name] for r in rounds), statistics.median(ratios), ratios)
    return out


def ddp_worker(model: str, steps: int, rounds: int, out: str) -> None:
    from lightning_sgd.plugins.grad_stats_ddp import GradStatsDDPStrategy

    configs = {
        "ddp none": lambda: (None, "ddp"),
        "ddp + hook source, every step": lambda: (GradientNoiseScale(source="ddp", schedule=1), "ddp"),
        "GradStatsDDP none": lambda: (None, GradStatsDDPStrategy(log_grad_norms=False)),
        "GradStatsDDP + record source, every step": lambda: (GradientNoiseScale(source="ddp", schedule=1),
                                                             GradStatsDDPStrategy(log_grad_norms=False)),
    }
    rank = 0
    rounds_out = []
    for r in range(rounds):
        medians = {}
        for name in _rotated(list(configs), r):
            callback, strategy = configs[name]()
            medians[name] = statistics.median(run(model, steps, 1, callback, batch=50, devices=2, strategy=strategy))
            rank = int(os.environ.get("LOCAL_RANK", 0))
        # what a user switching from plain DDP pays in all: the strategy's own measuring plus the callback
        medians["GradStatsDDP + record source, vs plain ddp"] = medians["GradStatsDDP + record source, every step"]
        rounds_out.append(medians)
    reference = {name: "GradStatsDDP none" if name.startswith("GradStats") else "ddp none" for name in rounds_out[0]}
    reference["GradStatsDDP + record source, vs plain ddp"] = "ddp none"
    if rank == 0:
        with open(out, "w") as f:
            json.dump(_summarize(rounds_out, reference), f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "cnn-wide", "mlp"], default="cnn",
                        help="cnn: the recipe's (25 channels, 5.2k params, ~3 ms steps, mostly Lightning's own "
                             "per-step Python); cnn-wide: 128 channels (~106k params), where compute dominates")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run (after 5 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all configurations, in rotated order")
    parser.add_argument("--ddp", action="store_true", help="also run the 2-process DDP comparison")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ddp_worker:
        ddp_worker(args.model, args.steps, args.rounds, args.ddp_worker)
        return
    print(f"model={args.model} batch=100 steps={args.steps} rounds={args.rounds} torch={torch.__version__} "
          f"threads=1", flush=True)
    result = single_device(args.model, args.steps, args.rounds)
    print(f"{'configuration':45s} {'cpu ms/step':>11s} {'ratio':>7s}   per-round ratios (median of rounds shown)")
    _print(result)
    if args.ddp:
        out = os.path.join(tempfile.mkdtemp(prefix="gns_overhead_"), "ddp_times.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--model", args.model, "--steps", str(args.steps),
                        "--rounds", str(args.rounds), "--ddp-worker", out], check=True, env=env)
        with open(out) as f:
            _print(json.load(f))


def _print(result: dict[str, Any]) -> None:
    for name, (ms, ratio, ratios) in result.items():
        print(f"{name:45s} {1e3 * ms:11.2f} {ratio:7.3f}   {' '.join(f'{x:.3f}' for x in ratios)}")


if __name__ == "__main__":
    main()
