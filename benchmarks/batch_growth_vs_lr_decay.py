"""MNIST-1D: constant batch + step LR decay vs batch growth at constant LR (Smith et al. 2018), same epochs.

Both runs train a recipe network (``MNIST1DMLP`` by default, ``--model cnn`` for ``MNIST1DCNN``) with SGD +
momentum from the same initial weights on the same data for the same number of epochs. Run ``lr_decay`` keeps the
batch at ``--batch`` and divides the LR by ``--factor`` at each epoch milestone (``MultiStepLR``); run
``batch_growth`` keeps the LR and multiplies the batch by ``--factor`` at the same milestones
(:class:`lightning_sgd.plugins.BatchSizeSchedule`, ``lr_rule="none"``). The script prints validation/test accuracy
and optimizer steps of each run and their ratio, and plots validation accuracy against epochs and against steps.

    python benchmarks/batch_growth_vs_lr_decay.py --out docs/img/batch_growth_mnist1d.png
    python benchmarks/batch_growth_vs_lr_decay.py --quick    # smoke test: 2 epochs, results to a temporary directory

Writes benchmarks/results/batch_growth_vs_lr_decay.json (every run's curve, steps, accuracies and wall time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import datetime, timezone

import pytorch_lightning as pl
import torch

from lightning_sgd.plugins import BatchSizeSchedule
from lightning_sgd.recipes import MNIST1DCNN, MNIST1DMLP, ClassificationModule, MNIST1DDataModule

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, save_results, summary_row, time_once  # noqa: E402


class _Curve(pl.Callback):
    """Per epoch: optimizer steps so far, validation accuracy, batch size and LR in use."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []
        self._batch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = max(self._batch, int(batch[0].shape[0]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.points.append({"epoch": trainer.current_epoch + 1, "steps": trainer.global_step,
                            "val_acc": float(trainer.callback_metrics["val/acc"]), "batch": self._batch,
                            "lr": trainer.optimizers[0].param_groups[0]["lr"]})
        self._batch = 0


def run(mode: str, args: argparse.Namespace, seed: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    milestones, factor = args.milestones, args.factor
    scheduler = None
    callbacks: list[pl.Callback] = [curve := _Curve()]
    if mode == "lr_decay":
        scheduler = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=1 / factor)  # noqa: E731
    else:
        callbacks.append(BatchSizeSchedule(milestones, factors=factor, interval="epoch", lr_rule="none"))
    module = ClassificationModule(
        MNIST1DCNN(channels=args.channels) if args.model == "cnn" else MNIST1DMLP(hidden=args.hidden), num_classes=10,
        optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay),
        lr_scheduler=scheduler, scheduler_interval="epoch")
    data = MNIST1DDataModule(num_train=args.num_train, batch_size=args.batch, seed=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks)
    _, wall = time_once(lambda: trainer.fit(module, datamodule=data))
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    return {"mode": mode, "seed": seed, "steps": trainer.global_step, "test_acc": test["test/acc"],
            "final_val_acc": curve.points[-1]["val_acc"], "wall_s": wall, "curve": curve.points}


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"lr_decay": "tab:blue", "batch_growth": "tab:orange"}
    labels = {"lr_decay": "constant batch, LR decay", "batch_growth": "batch growth, constant LR"}
    for result in results:
        xs_epoch = [p["epoch"] for p in result["curve"]]
        xs_steps = [p["steps"] for p in result["curve"]]
        ys = [p["val_acc"] for p in result["curve"]]
        label = labels[result["mode"]] if result["seed"] == results[0]["seed"] else None
        axes[0].plot(xs_epoch, ys, color=colors[result["mode"]], label=label, alpha=0.85)
        axes[1].plot(xs_steps, ys, color=colors[result["mode"]], label=label, alpha=0.85)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes:
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--milestones", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--channels", type=int, default=25, help="CNN width")
    parser.add_argument("--hidden", type=int, default=100, help="MLP width")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None, help="PNG path for the figure")
    parser.add_argument("--json", default=None, help="also write all results here (they always go to "
                        "benchmarks/results/batch_growth_vs_lr_decay.json)")
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.milestones, args.num_train, args.seeds = 2, [1], 400, args.seeds[:1]
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    results = [run(mode, args, seed) for seed in args.seeds for mode in ("lr_decay", "batch_growth")]
    print(f"{'mode':>13} {'seed':>4} {'steps':>6} {'val acc':>8} {'test acc':>8} {'wall s':>7}")
    for r in results:
        print(f"{r['mode']:>13} {r['seed']:>4} {r['steps']:>6} {r['final_val_acc']:>8.4f} {r['test_acc']:>8.4f} "
              f"{r['wall_s']:>7.1f}")
    pairs = []
    for seed in args.seeds:
        decay, growth = (next(r for r in results if r["mode"] == m and r["seed"] == seed)
                         for m in ("lr_decay", "batch_growth"))
        pairs.append((decay, growth))
        print(f"seed {seed}: steps growth/decay = {growth['steps'] / decay['steps']:.3f}, test acc growth - decay = "
              f"{growth['test_acc'] - decay['test_acc']:+.4f}, wall growth/decay = "
              f"{growth['wall_s'] / decay['wall_s']:.2f}")
    title = (f"MNIST-1D {args.model.upper()}, {args.epochs} epochs, batch {args.batch}, LR {args.lr}, "
             f"x{args.factor:g} at epochs {args.milestones}")
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        plot(results, args.out, f"{title}; {platform.processor() or platform.machine()}, {stamp}")
        print(f"figure: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    acc = {m: statistics.fmean(p[i]["test_acc"] for p in pairs) for i, m in enumerate(("lr_decay", "batch_growth"))}
    steps = {m: statistics.median(p[i]["steps"] for p in pairs) for i, m in enumerate(("lr_decay", "batch_growth"))}
    ratios = [g["steps"] / d["steps"] for d, g in pairs]
    row = summary_row(f"{title}, {len(pairs)} seed(s): optimizer steps, batch growth / LR decay",
                      f"batch growth, test acc {acc['batch_growth']:.4f}, {steps['batch_growth']:g} steps",
                      f"LR decay, test acc {acc['lr_decay']:.4f}, {steps['lr_decay']:g} steps",
                      statistics.median(ratios), "fewer steps, same accuracy (Smith et al. 2018)",
                      spread=[min(ratios), max(ratios)])
    path = save_results("batch_growth_vs_lr_decay", {"config": vars(args), "results": results}, args, summary=[row])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
