"""Acting on the noise scale: AdaptiveBatchSize (driven by the measured B_simple) against every fixed batch size of a
sweep, each with the learning rate (and momentum) the sweep tuned for it, to the same target.

McCandlish et al. (2018): training at B ≈ B_noise balances steps against examples, and B_noise grows as the loss
falls, so a batch that grows with the measured noise scale should beat every fixed batch on steps at equal examples.
Anchor: Gray et al. (2024, NeurIPS) cut training time by 18% with a noise-scale-driven batch schedule on a
compute-optimal language model.

Protocol. Read the sweep's ``results.json`` (default: the MNIST-1D CNN sweep, ``recipes/mnist1d_sweep.yaml``). For
every batch size of the sweep: train with its tuned hyper-parameters to the sweep's target, evaluated every
``eval_every`` steps, for each seed. Adaptive: start at the smallest batch size with its tuned hyper-parameters; a
:class:`lightning_sgd.callbacks.GradientNoiseScale` (per-example norms every step) drives
:class:`lightning_sgd.plugins.AdaptiveBatchSize` (a decision every ``--every`` steps, growth at most 2× per decision,
up to the largest batch of the sweep, the learning rate scaled linearly with the batch: the rule the sweep's tuned
learning rates follow). Reported: steps and examples to target per run, their median and range over seeds, the
fixed-batch Pareto front of (steps, examples), and the fixed batch (interpolated on the front, log-log) that uses as
many examples as the adaptive run: the steps it needs there against the adaptive run's.

    python benchmarks/adaptive_vs_fixed.py [--sweep-dir runs/sweep_mnist1d] [--seeds 0 1 2] [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def sweep_config(sweep_yaml: str, sweep_dir: str) -> Any:
    from lightning_sgd.sweep.cli import parse

    cfg, _ = parse(["--sweep", sweep_yaml, f"--sweep.output_dir={sweep_dir}"])
    return cfg


def run(cfg: Any, batch_size: int, values: dict[str, float], seed: int, adaptive: bool, every: int, max_batch: int,
        lr_rule: str) -> dict[str, Any]:
    """One training run to the sweep's target; returns steps and examples to target and the batch-size history."""
    import pytorch_lightning as pl

    from lightning_sgd.callbacks import GradientNoiseScale
    from lightning_sgd.plugins import AdaptiveBatchSize
    from lightning_sgd.sweep.runner import TargetStopper, _quiet, _threads, build_trial

    class ExampleCounter(pl.Callback):
        """Examples seen up to each step, and the batch size in use at each evaluation."""

        def __init__(self) -> None:
            self.examples = 0
            self.at_step: dict[int, int] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.examples += len(batch[1])
            self.at_step[trainer.global_step] = self.examples

    run_cfg = type(cfg)(**{**cfg.__dict__, "overrides": [*cfg.overrides, f"--seed_everything={seed}"]})
    t0 = time.perf_counter()
    with _quiet(), _threads(cfg.threads):
        model, data, trainer = build_trial(run_cfg, batch_size, values)
        counter = ExampleCounter()
        stopper = TargetStopper(cfg.metric, float(cfg.target), cfg.resolved_mode())
        extra: list[Any] = []
        if adaptive:
            gns = GradientNoiseScale(schedule=1)
            controller = AdaptiveBatchSize(max_batch_size=max_batch, every_n_steps=every, lr_rule=lr_rule,
                                           noise_scale=gns)
            extra = [gns, controller]
        trainer.callbacks.extend([*extra, counter, stopper])
        trainer.fit(model, datamodule=data)
    steps = stopper.reached_at
    out = {"batch_size": batch_size, "adaptive": adaptive, "seed": seed, "steps": steps,
           "examples": counter.at_step.get(steps) if steps is not None else None, "reached": steps is not None,
           "seconds": time.perf_counter() - t0}
    if adaptive:
        out["history"] = [[int(h["step"]), int(h["global_batch_size"])] for h in controller.history]
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(steps, examples) points not dominated by another (fewer or equal in both, fewer in one)."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(front, key=lambda p: p[1])


def steps_on_front(front: list[tuple[float, float]], examples: float) -> float | None:
    """Steps of the fixed-batch front at ``examples`` (log-log interpolation between its points); None outside."""
    xs = [math.log(e) for _, e in front]
    ys = [math.log(s) for s, _ in front]
    x = math.log(examples)
    if not front or x < xs[0] or x > xs[-1]:
        return None
    return float(math.exp(np.interp(x, xs, ys)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default=str(REPO / "recipes/mnist1d_sweep.yaml"), help="the sweep YAML")
    parser.add_argument("--sweep-dir", default="runs/sweep_mnist1d", help="its output_dir (results.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=25, help="AdaptiveBatchSize decision interval (steps)")
    parser.add_argument("--lr-rule", default="linear", choices=("linear", "sqrt", "none"))
    parser.add_argument("--out", default="docs/img", help="folder for adaptive_vs_fixed.png/json")
    parser.add_argument("--from-json", default=None, help="re-summarize and re-plot the runs of an earlier output")
    args = parser.parse_args()
    cfg = sweep_config(args.sweep, args.sweep_dir)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        runs, args.seeds = saved["runs"], saved["seeds"]
        sizes = sorted({x["batch_size"] for x in runs if not x["adaptive"]})
        report(runs, sizes, cfg, args)
        return
    summary = json.loads(Path(args.sweep_dir, "results.json").read_text())
    rows = [r for r in summary["rows"] if r["reached"]]
    sizes = [r["batch_size"] for r in rows]
    runs = []
    for seed in args.seeds:  # seeds outermost: a partial run still compares like with like
        for r in rows:
            runs.append(run(cfg, r["batch_size"], r["best_params"], seed, False, args.every, max(sizes),
                            args.lr_rule))
            print(f"fixed B={r['batch_size']:4d} seed {seed}: {runs[-1]['steps']} steps, {runs[-1]['examples']} "
                  f"examples ({runs[-1]['seconds']:.0f} s)", flush=True)
        runs.append(run(cfg, sizes[0], rows[0]["best_params"], seed, True, args.every, max(sizes), args.lr_rule))
        print(f"adaptive from B={sizes[0]} seed {seed}: {runs[-1]['steps']} steps, {runs[-1]['examples']} examples, "
              f"batch history {runs[-1].get('history')} ({runs[-1]['seconds']:.0f} s)", flush=True)
    report(runs, sizes, cfg, args)


def report(runs: list[dict[str, Any]], sizes: list[int], cfg: Any, args: argparse.Namespace) -> None:
    """Medians over seeds, the Pareto front, the comparison at equal examples; JSON and plot in ``args.out``.
    A run that did not reach the target within the sweep's budget counts as such (``reached`` k of n), and its
    medians are over the runs that did."""

    def medians(sel: list[dict[str, Any]]) -> tuple[float, float, list[int], list[int], int]:
        hit = [x for x in sel if x["reached"]]
        steps = [x["steps"] for x in hit]
        examples = [x["examples"] for x in hit]
        return float(np.median(steps)), float(np.median(examples)), steps, examples, len(sel)

    table = []
    for b in sizes:
        s, e, ss, es, n = medians([x for x in runs if not x["adaptive"] and x["batch_size"] == b])
        table.append({"batch_size": b, "steps": s, "examples": e, "steps_runs": ss, "examples_runs": es, "runs": n})
    s, e, ss, es, n = medians([x for x in runs if x["adaptive"]])
    adaptive = {"steps": s, "examples": e, "steps_runs": ss, "examples_runs": es, "runs": n}
    front = pareto([(t["steps"], t["examples"]) for t in table])
    at_same = steps_on_front(front, adaptive["examples"])
    adaptive["front_steps_at_same_examples"] = at_same
    adaptive["step_saving"] = None if at_same is None else 1.0 - adaptive["steps"] / at_same
    adaptive["on_or_beyond_front"] = all(not (p[0] <= s and p[1] <= e and (p[0] < s or p[1] < e)) for p in front)
    print(f"\nsteps / examples to {cfg.metric} {cfg.target}, median over seeds {args.seeds} (range)")
    for t in table:
        print(f"fixed B={t['batch_size']:4d}: {t['steps']:7.0f} steps [{min(t['steps_runs'])}, {max(t['steps_runs'])}]"
              f" {t['examples']:9.0f} examples; reached {len(t['steps_runs'])} of {t['runs']}")
    print(f"adaptive      : {adaptive['steps']:7.0f} steps [{min(ss)}, {max(ss)}] {adaptive['examples']:9.0f} examples "
          f"[{min(es)}, {max(es)}]; reached {len(ss)} of {n}")
    if at_same is not None:
        print(f"fixed-batch front at {adaptive['examples']:.0f} examples: {at_same:.0f} steps -> adaptive needs "
              f"{100 * adaptive['step_saving']:.0f}% fewer steps; on or beyond the front: "
              f"{adaptive['on_or_beyond_front']}")
    else:
        print(f"the adaptive run's examples lie outside the fixed front's range; on or beyond the front: "
              f"{adaptive['on_or_beyond_front']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adaptive_vs_fixed.json"), "w") as f:
        json.dump({"target": cfg.target, "metric": cfg.metric, "seeds": args.seeds, "lr_rule": args.lr_rule,
                   "every": args.every, "fixed": table, "adaptive": adaptive, "runs": runs}, f, indent=2)
    plot(table, adaptive, runs, front, cfg, os.path.join(args.out, "adaptive_vs_fixed.png"))


def plot(table: list[dict[str, Any]], adaptive: dict[str, Any], runs: list[dict[str, Any]],
         front: list[tuple[float, float]], cfg: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for x in runs:
        if x["reached"]:
            ax.plot(x["examples"], x["steps"], ".", color="C3" if x["adaptive"] else "C0", alpha=0.35, ms=5)
    ax.plot([t["examples"] for t in table], [t["steps"] for t in table], "o-", color="C0",
            label="fixed batch (median over seeds)")
    for t in table:
        ax.annotate(f"B={t['batch_size']}", (t["examples"], t["steps"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.plot([e for _, e in front], [s for s, _ in front], "--", color="gray", label="fixed-batch Pareto front")
    ax.plot([adaptive["examples"]], [adaptive["steps"]], "*", color="C3", ms=15,
            label="AdaptiveBatchSize from B_simple (median)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to target")
    ax.set_ylabel(f"optimizer steps to {cfg.metric} {cfg.target}")
    ax.set_title("acting on the measured noise scale", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
