"""Deep bootstrap on MNIST-1D for two training-set sizes, one plot: the README figure of DeepBootstrap.

Runs ``recipes/mnist1d_bootstrap.yaml`` through the ``lightning-sgd`` CLI (in-process) once per ``--num-train``
value, collects each run's DeepBootstrap history, prints a table and writes one PNG with both runs' real/ideal
test-error curves. Both runs start from the same weights and their twins read the same fresh stream (they differ
only through the input normalization, estimated from the n training examples), so essentially only the real world
changes with n.

    python benchmarks/deep_bootstrap_mnist1d.py --num-train 500 4000 --out docs/img/bootstrap_mnist1d.png

Logs of each run go under ``runs/`` of the working directory (W&B offline + CSV, each with its own PNG). The
table, the histories and each run's wall time also go to benchmarks/results/deep_bootstrap_mnist1d.json.

    python benchmarks/deep_bootstrap_mnist1d.py --quick   # smoke test: n=200, 20 steps, in a temporary directory
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from lightning_sgd.bootstrap import first_fit_step, plot_bootstrap
from lightning_sgd.callbacks import DeepBootstrap
from lightning_sgd.cli import run

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, save_results, summary_row, time_once  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist1d_bootstrap.yaml"


def fit(n: int, max_steps: int, extra: list[str]):
    """The recipe's fit on n training examples, and its wall seconds."""
    cli = []
    _, wall = time_once(lambda: cli.append(run(["fit", "--config", str(RECIPE), f"--data.init_args.num_train={n}",
                                                f"--trainer.max_steps={max_steps}", *extra])))
    return cli[0], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, nargs="+", default=[500, 4000])
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--out", default="bootstrap_mnist1d.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    add_output_options(parser)
    args = parser.parse_args()
    extra: list[str] = []
    if args.quick:  # a smoke test: logs and the plot go to a temporary working directory
        args.num_train, args.max_steps = [200], 20
        extra = ["--data.init_args.num_test=200", "--trainer.enable_progress_bar=false"]
        args.results_dir = args.results_dir and os.path.abspath(args.results_dir)
        os.chdir(tempfile.mkdtemp(prefix="deep_bootstrap_quick_"))
    torch.set_num_threads(args.threads)

    histories: dict[str, list[dict[str, float]]] = {}
    timings: dict[str, float] = {}
    for n in args.num_train:
        cli, timings[f"n={n}"] = fit(n, args.max_steps, extra)
        callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DeepBootstrap))
        histories[f"n={n}"] = callback.history

    print(f"\n== deep bootstrap, MNIST-1D CNN, Adam 1e-2, batch 50, {args.max_steps} steps ==")
    print(f"{'run':>8s} {'epochs':>7s} {'fit@1%':>7s} {'gap@fit':>8s} {'max gap before':>15s} "
          f"{'real test':>10s} {'ideal test':>11s} {'final gap':>10s} {'wall s':>7s}")
    table, rows = {}, []
    for label, history in histories.items():
        n = int(label.split("=")[1])
        fitted = first_fit_step(history)
        before = [h["bootstrap/gap"] for h in history if fitted is None or h["step"] < fitted]
        at_fit = next((h["bootstrap/gap"] for h in history if h["step"] == fitted), float("nan"))
        last = history[-1]
        table[label] = {"num_train": n, "epochs": args.max_steps * 50 / n, "fit_step_1pct": fitted,
                        "gap_at_fit": at_fit, "max_gap_before_fit": max(before),
                        "real_test_error": last["bootstrap/real_test_error"],
                        "ideal_test_error": last["bootstrap/ideal_test_error"], "final_gap": last["bootstrap/gap"],
                        "wall_s": timings[label]}
        print(f"{label:>8s} {args.max_steps * 50 / n:7.0f} {fitted if fitted is not None else 'never':>7} "
              f"{at_fit:8.3f} {max(before):15.3f} {last['bootstrap/real_test_error']:10.3f} "
              f"{last['bootstrap/ideal_test_error']:11.3f} {last['bootstrap/gap']:10.3f} {timings[label]:7.0f}")
        rows.append(summary_row(
            f"deep bootstrap, MNIST-1D CNN, n={n}, {args.max_steps} steps: final test error, real / ideal world",
            f"real world {last['bootstrap/real_test_error']:.3f} "
            f"({'never fit' if fitted is None else f'fit at step {fitted}'})",
            f"ideal world {last['bootstrap/ideal_test_error']:.3f}",
            last["bootstrap/real_test_error"] / last["bootstrap/ideal_test_error"],
            "(figures only)"))
    title = f"Deep bootstrap, MNIST-1D CNN ({args.max_steps} steps of batch 50)"
    plot_bootstrap(histories, args.out, title=title)
    Path(args.out).with_suffix(".json").write_text(json.dumps(histories))
    print(f"plot: {Path(args.out).resolve()}; histories: {Path(args.out).with_suffix('.json').resolve()}")
    path = save_results("deep_bootstrap_mnist1d", {"config": vars(args), "runs": table, "histories": histories},
                        args, summary=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
