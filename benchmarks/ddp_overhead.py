"""Step time of GradStatsDDPStrategy vs plain DDPStrategy: 2 CPU processes (gloo), same model, same data.

    python benchmarks/ddp_overhead.py                     # MLP 256→1024→1024→1024→10 (~2.4 M params), batch 64/rank
    python benchmarks/ddp_overhead.py --batch-size 256 --every-n-steps 10

Lightning's launcher re-runs this script for rank 1. Both strategies train the same model from the same init on
the same batches; they alternate in short blocks (plain, stats, plain, stats, ...) so that load from other
programs on a shared machine hits both alike, and each block's first ``--warmup`` steps are dropped. A callback
times every optimizer step on rank 0 (``on_train_batch_start`` → ``on_train_batch_end``: forward, backward with
the all-reduce, optimizer step, the strategy's bookkeeping) on two clocks: wall time, and the process's CPU time
(all threads, gloo's included), which ignores time spent descheduled on a busy machine. Printed per clock: median
step time per strategy, the ratio of medians, and the ratio per block pair (its spread shows the noise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.plugins.grad_stats_ddp import GradStatsDDPStrategy


class _Net(pl.LightningModule):
    def __init__(self, features: int, hidden: int, depth: int, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        sizes = [features] + [hidden] * depth
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _StepTimer(pl.Callback):
    """Wall time and process CPU time (all threads, gloo's included) of every training step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.wall.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def _fit(strategy: DDPStrategy, args: argparse.Namespace, data: TensorDataset) -> dict[str, list[float]]:
    timer = _StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], use_distributed_sampler=True)
    trainer.fit(_Net(args.features, args.hidden, args.depth, args.classes),
                DataLoader(data, batch_size=args.batch_size, shuffle=False))
    return {"wall": timer.wall[args.warmup:], "cpu": timer.cpu[args.warmup:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each block")
    parser.add_argument("--reps", type=int, default=5, help="block pairs (plain, stats)")
    parser.add_argument("--every-n-steps", type=int, default=1, help="GradStatsDDPStrategy(every_n_steps=...)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    g = torch.Generator().manual_seed(0)
    n = 2 * args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, args.features, generator=g), torch.randint(0, args.classes, (n,), generator=g))

    plain: list[dict[str, list[float]]] = []
    stats: list[dict[str, list[float]]] = []
    for _ in range(args.reps):
        plain.append(_fit(DDPStrategy(), args, data))
        stats.append(_fit(GradStatsDDPStrategy(log_grad_norms=False, every_n_steps=args.every_n_steps), args, data))
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    n_params = sum(p.numel() for p in _Net(args.features, args.hidden, args.depth, args.classes).parameters())
    print(f"model: MLP {args.features}→{args.hidden}×{args.depth}→{args.classes} ({n_params / 1e6:.2f} M params), "
          f"batch {args.batch_size}/process, 2 CPU processes (gloo), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{args.reps}×{args.steps - args.warmup} timed steps per strategy (rank 0), "
          f"every_n_steps={args.every_n_steps}")
    for clock in ("wall", "cpu"):
        med_plain = statistics.median(t for block in plain for t in block[clock])
        med_stats = statistics.median(t for block in stats for t in block[clock])
        pairs = [statistics.median(s[clock]) / statistics.median(p[clock]) for p, s in zip(plain, stats)]
        print(f"[{clock:4s}] DDPStrategy {1e3 * med_plain:8.2f} ms   GradStatsDDPStrategy {1e3 * med_stats:8.2f} ms   "
              f"ratio {med_stats / med_plain:.3f} (target <= 1.02)   per block pair: "
              f"{' '.join(f'{r:.3f}' for r in pairs)}")

if __name__ == "__main__":
    main()
