"""Step time of GradStatsDDPStrategy vs plain DDPStrategy: 2 CPU processes (gloo), same model, same data.

    python benchmarks/ddp_overhead.py                     # MLP 256→1024→1024→1024→10 (~2.4 M params), batch 64/rank
    python benchmarks/ddp_overhead.py --batch-size 256 --every-n-steps 10
    python benchmarks/ddp_overhead.py --breakdown          # where the overhead goes (raw DDP, no Lightning)

Lightning's launcher re-runs this script for rank 1. Both strategies train the same model from the same init on
the same batches; they alternate in short blocks (plain, stats, stats, plain, ...) so that load from other
programs on a shared machine hits both alike, and each block's first ``--warmup`` steps are dropped. A callback
times every optimizer step on rank 0 (``on_train_batch_start`` → ``on_train_batch_end``: forward, backward with
the all-reduce, optimizer step, the strategy's bookkeeping) on two clocks: wall time, and the process's CPU time
(all threads, gloo's included), which ignores time spent descheduled on a busy machine. Printed per clock: median
step time per strategy, the ratio of medians, and the ratio per block pair (its spread shows the noise).

``--breakdown`` times the pieces instead, without Lightning: first single-process memory passes over a gradient
of the model's size, then 2 gloo processes (torch.multiprocessing) training one copy of the model per variant,
the variants interleaved step by step (finer than blocks, so machine load hits them alike): plain DDP; DDP with
the C++ built-in all-reduce comm hook (bucket copy and 1/W division no longer fused); DDP with the Python
``allreduce_hook``; the strategy's comm-hook recorder (its path with a user hook or gradient_as_bucket_view); its
default recorder (no comm hook); and the default recorder with the local-norm all-reduce but no norm passes.
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


def _breakdown_worker(rank: int, args: argparse.Namespace, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from lightning_sgd.plugins import grad_stats_ddp as gs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, args.features, generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)

    def variant(name: str):  # -> (ddp model, optimizer, before backward(loss), after backward())
        net = _Net(args.features, args.hidden, args.depth, args.classes).net
        model = DistributedDataParallel(net)
        before, after = (lambda loss: None), (lambda: None)
        if name == "C++ allreduce hook":
            model._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)
        elif name == "Python allreduce_hook":
            model.register_comm_hook(None, default_hooks.allreduce_hook)
        elif name.startswith("stats"):
            if name == "stats, comm hook":
                rec = gs._BucketNormRecorder(None)
                model.register_comm_hook(rec, gs._grad_stats_hook)
            else:
                rec = gs._BackwardEndRecorder(None, list(net.parameters()))
                before = rec.arm
                if name.endswith("no norm passes"):
                    rec.params = []  # the W-float all-reduce and the callbacks only

            def after() -> None:
                if rec.synced:
                    local, global_sq = rec.collect()
                    float(global_sq), bool(torch.isfinite(local).all())
        return model, torch.optim.SGD(model.parameters(), lr=1e-3), before, after

    names = ["plain DDP", "C++ allreduce hook", "Python allreduce_hook", "stats, comm hook", "stats, default",
             "stats, default, no norm passes"]
    variants = {name: variant(name) for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.breakdown_steps):
        for name, (model, opt, before, after) in variants.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = nn.functional.cross_entropy(model(x), y)
            before(loss)
            loss.backward()
            after()
            opt.step()
            opt.zero_grad()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    if rank == 0:
        skip = min(10, args.breakdown_steps // 5)
        base = {k: statistics.median(v[skip:]) for k, v in (("wall", wall[names[0]]), ("cpu", cpu[names[0]]))}
        print(f"2 gloo processes, {args.breakdown_steps} steps per variant interleaved step by step (rank 0 medians):")
        for name in names:
            w, c = statistics.median(wall[name][skip:]), statistics.median(cpu[name][skip:])
            print(f"  {name:32s} wall {1e3 * w:7.2f} ms ({w / base['wall']:.3f})   "
                  f"cpu {1e3 * c:7.2f} ms ({c / base['cpu']:.3f}, {1e3 * (c - base['cpu']):+.2f} ms)")
    dist.destroy_process_group()


def _passes(args: argparse.Namespace) -> None:
    """Single-process cost of one memory pass over a gradient of the model's size (hot: the same tensors again;
    cold: cycling through 12 copies, ~12x the model's size)."""
    from lightning_sgd.plugins import grad_stats_ddp as gs

    def timed(f, sets: list, n: int = 60) -> float:
        for i in range(3):
            f(sets[i % len(sets)])
        t0 = time.perf_counter()
        for i in range(n):
            f(sets[i % len(sets)])
        return 1e3 * (time.perf_counter() - t0) / n

    shapes = [tuple(p.shape) for p in _Net(args.features, args.hidden, args.depth, args.classes).parameters()]
    hot = [[torch.randn(s) for s in shapes]]
    cold = [[torch.randn(s) for s in shapes] for _ in range(12)]
    flat_hot = [torch.cat([g.flatten() for g in grads]) for grads in hot]
    flat_cold = [torch.cat([g.flatten() for g in grads]) for grads in cold]
    outs = [torch.empty_like(f) for f in flat_cold]
    ops = {
        "_foreach_norm over the parameter grads": (lambda gs_: gs._grads_sq_norm(gs_), hot, cold),
        "torch.dot on the flat gradient": (lambda f: torch.dot(f, f), flat_hot, flat_cold),
        "in-place division (div_)": (lambda f: f.div_(1.0), flat_hot, flat_cold),
        "copy into another buffer": (lambda f: outs[0][: f.numel()].copy_(f), flat_hot, flat_cold),
    }
    n_params = sum(f.numel() for f in flat_hot)
    print(f"one pass over {n_params / 1e6:.2f} M fp32 ({4 * n_params / 1e6:.1f} MB), 1 thread:")
    for name, (f, h, c) in ops.items():
        print(f"  {name:40s} hot {timed(f, h):.3f} ms   cold {timed(f, c):.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each block")
    parser.add_argument("--reps", type=int, default=6, help="block pairs (plain first in even pairs, stats in odd)")
    parser.add_argument("--every-n-steps", type=int, default=1, help="GradStatsDDPStrategy(every_n_steps=...)")
    parser.add_argument("--breakdown", action="store_true", help="time the pieces instead (raw DDP, no Lightning)")
    parser.add_argument("--breakdown-steps", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.breakdown:
        import socket

        import torch.multiprocessing as mp

        _passes(args)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_breakdown_worker, args=(args, port), nprocs=2)
        return
    g = torch.Generator().manual_seed(0)
    n = 2 * args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, args.features, generator=g), torch.randint(0, args.classes, (n,), generator=g))

    plain: list[dict[str, list[float]]] = []
    stats: list[dict[str, list[float]]] = []
    for rep in range(args.reps):
        # ABBA order: in a plain-vs-plain control run on the loaded machine the second block of a pair came out
        # 3-6% slower than the first, so each strategy goes first in half of the pairs
        for kind in (("plain", "stats") if rep % 2 == 0 else ("stats", "plain")):
            if kind == "plain":
                plain.append(_fit(DDPStrategy(), args, data))
            else:
                stats.append(_fit(GradStatsDDPStrategy(log_grad_norms=False, every_n_steps=args.every_n_steps),
                                  args, data))
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
