"""GradientNoiseScale overhead: step time with vs without the callback, same model and data, side by side.

Configurations run in rounds, each round in a rotated order (so a slow patch of a shared machine hits all of them
alike); within a round the median per-step process CPU time (one torch thread; benchmarks/_harness.py's StepClock
and compare_measured) of each configuration is divided by that of the matching no-callback run, and the median of
these per-round ratios is reported:

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
    python benchmarks/gns_overhead.py --quick    # smoke test: 3 steps, 1 round, results to a temporary directory

Writes benchmarks/results/gns_overhead.json (gns_overhead_<model>.json for the other models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.callbacks import GradientNoiseScale
from lightning_sgd.recipes import MNIST1DCNN, MNIST1DMLP, ClassificationModule

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import StepClock, add_output_options, compare_measured, save_results, summary_row  # noqa: E402

warnings.filterwarnings("ignore")
WARMUP = 5  # steps of each run left out of its statistics


def make_module(model: str) -> ClassificationModule:
    torch.manual_seed(0)
    net = {"cnn": MNIST1DCNN, "cnn-wide": lambda: MNIST1DCNN(channels=128), "mlp": MNIST1DMLP}[model]()
    return ClassificationModule(net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


def make_loader(batch_size: int, n: int = 4000) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g, drop_last=True)


def run(model: str, steps: int, accumulate: int, callback: GradientNoiseScale | None, batch: int = 100,
        **trainer_kwargs: Any) -> StepClock:
    clock = StepClock()
    callbacks = [clock] + ([callback] if callback is not None else [])
    kwargs = dict(accelerator="cpu", devices=1, max_steps=WARMUP + steps + 1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, limit_val_batches=0, accumulate_grad_batches=accumulate, callbacks=callbacks)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(make_module(model), make_loader(batch // accumulate))
    return clock


def single_device(model: str, steps: int, rounds: int) -> dict[str, dict[str, Any]]:
    def config(name: str, accumulate: int, factory, mean: bool = False):
        def fn():
            clock = run(model, steps, accumulate, factory())
            out = {name: clock.median(WARMUP)}
            if mean:  # the default schedule's overall cost is the mean step time (1 in 50 steps is slow)
                out[f"{name} [mean]"] = clock.mean(WARMUP)
            return out
        return fn

    configs = {
        "none": config("none", 1, lambda: None, mean=True),
        "per_example (hooks), every step": config("per_example (hooks), every step", 1, lambda: GradientNoiseScale(
            source="per_example", schedule=1, engine="hooks")),
        "per_example (vmap), every step": config("per_example (vmap), every step", 1, lambda: GradientNoiseScale(
            source="per_example", schedule=1, engine="vmap")),
        "split (4 parts), every step": config("split (4 parts), every step", 1, lambda: GradientNoiseScale(
            source="split", schedule=1)),
        "default (auto, every 50)": config("default (auto, every 50)", 1, lambda: GradientNoiseScale(), mean=True),
        "none, accumulate 2": config("none, accumulate 2", 2, lambda: None),
        "accumulation, every step": config("accumulation, every step", 2, lambda: GradientNoiseScale(
            source="accumulation", schedule=1)),
    }
    reference = {name: "none" for name in configs}
    reference.update({"none, accumulate 2": "none, accumulate 2", "accumulation, every step": "none, accumulate 2",
                      "none [mean]": "none [mean]", "default (auto, every 50) [mean]": "none [mean]"})
    return compare_measured(configs, reference, rounds=rounds)


def ddp_worker(model: str, steps: int, rounds: int, out: str) -> None:
    from lightning_sgd.plugins.grad_stats_ddp import GradStatsDDPStrategy

    def config(name: str, callback, strategy):
        def fn():
            clock = run(model, steps, 1, callback(), batch=50, devices=2, strategy=strategy())
            if name == "GradStatsDDP + record source, every step":
                # what a user switching from plain DDP pays in all: the strategy's own measuring plus the callback
                return {name: clock.median(WARMUP), "GradStatsDDP + record source, vs plain ddp": clock.median(WARMUP)}
            return {name: clock.median(WARMUP)}
        return fn

    stats = lambda: GradStatsDDPStrategy(log_grad_norms=False)  # noqa: E731
    gns = lambda: GradientNoiseScale(source="ddp", schedule=1)  # noqa: E731
    configs = {
        "ddp none": config("ddp none", lambda: None, lambda: "ddp"),
        "ddp + hook source, every step": config("ddp + hook source, every step", gns, lambda: "ddp"),
        "GradStatsDDP none": config("GradStatsDDP none", lambda: None, stats),
        "GradStatsDDP + record source, every step": config("GradStatsDDP + record source, every step", gns, stats),
    }
    reference = {"ddp none": "ddp none", "ddp + hook source, every step": "ddp none",
                 "GradStatsDDP none": "GradStatsDDP none",
                 "GradStatsDDP + record source, every step": "GradStatsDDP none",
                 "GradStatsDDP + record source, vs plain ddp": "ddp none"}
    result = compare_measured(configs, reference, rounds=rounds)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        with open(out, "w") as f:
            json.dump(result, f)


TARGETS = {"per_example (hooks), every step": "≤ 1.6×", "default (auto, every 50) [mean]": "≤ 1.05×",
           "accumulation, every step": "≤ 1.03×", "ddp + hook source, every step": "≤ 1.03×",
           "GradStatsDDP + record source, every step": "≤ 1.03×"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "cnn-wide", "mlp"], default="cnn",
                        help="cnn: the recipe's (25 channels, 5.2k params, ~3 ms steps, mostly Lightning's own "
                             "per-step Python); cnn-wide: 128 channels (~106k params), where compute dominates")
    parser.add_argument("--steps", type=int, default=60, help=f"measured steps per run (after {WARMUP} warm-up steps)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all configurations, in rotated order")
    parser.add_argument("--ddp", action="store_true", help="also run the 2-process DDP comparison")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    add_output_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.rounds = 3, 1
    if args.ddp_worker:
        ddp_worker(args.model, args.steps, args.rounds, args.ddp_worker)
        return
    print(f"model={args.model} batch=100 steps={args.steps} rounds={args.rounds} torch={torch.__version__} "
          f"threads=1", flush=True)
    result = single_device(args.model, args.steps, args.rounds)
    print(f"{'configuration':45s} {'cpu ms/step':>11s} {'ratio':>7s}   per-round ratios (median of rounds shown)")
    _print(result)
    if args.ddp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with tempfile.TemporaryDirectory(prefix="gns_overhead_") as tmp:
            out = os.path.join(tmp, "ddp_times.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--model", args.model, "--steps",
                            str(args.steps), "--rounds", str(args.rounds), "--ddp-worker", out], check=True, env=env)
            with open(out) as f:
                ddp = json.load(f)
        _print(ddp)
        result.update(ddp)
    label = {"cnn": "MNIST-1D CNN", "cnn-wide": "MNIST-1D CNN, 128 channels", "mlp": "MNIST-1D MLP"}[args.model]
    rows = [summary_row(f"GNS step-time overhead, {label}, batch 100: {name}", f"{1e3 * r['cpu_s']:.3g} ms/step",
                        f"{r['reference']}, {1e3 * result[r['reference']]['cpu_s']:.3g} ms/step", r["ratio"],
                        TARGETS.get(name, ""), spread=r["spread"])
            for name, r in result.items()
            if r["reference"] != name and name != "default (auto, every 50)"]  # its cost is the mean step's
    path = save_results("gns_overhead" if args.model == "cnn" else f"gns_overhead_{args.model}",
                        {"config": vars(args), "clock": "cpu", "timing": result}, args, summary=rows)
    print(f"wrote {path}")


def _print(result: dict[str, Any]) -> None:
    for name, r in result.items():
        print(f"{name:45s} {1e3 * r['cpu_s']:11.2f} {r['ratio']:7.3f}   {' '.join(f'{x:.3f}' for x in r['ratios'])}")


if __name__ == "__main__":
    main()
