"""Step time of GradStatsDDPStrategy vs plain DDPStrategy: 2 CPU processes (gloo), same model, same data.

    python benchmarks/ddp_overhead.py                     # MLP 256→1024→1024→1024→10 (~2.4 M params), batch 64/rank
    python benchmarks/ddp_overhead.py --batch-size 256 --every-n-steps 10
    python benchmarks/ddp_overhead.py --breakdown          # where the overhead goes (raw DDP, no Lightning)
    python benchmarks/ddp_overhead.py --quick              # smoke test: tiny MLP, results to a temporary directory

Lightning's launcher re-runs this script for rank 1. Both strategies train the same model from the same init on
the same batches; they alternate in short blocks (the shared harness's rotated rounds: plain, stats, stats, plain,
...) so that load from other programs on a shared machine hits both alike, and each block's first ``--warmup``
steps are dropped. benchmarks/_harness.py's StepClock times every optimizer step on rank 0 (from one step's start
to the next: forward, backward with the all-reduce, optimizer step, the strategy's bookkeeping) on two clocks:
wall time, and the process's CPU time (all threads, gloo's included), which ignores time spent descheduled on a
busy machine. Printed per clock: median step time per strategy and the median over block pairs of the pair's
ratio (the per-pair ratios' spread shows the noise). Writes benchmarks/results/ddp_overhead.json
(ddp_overhead_batch<N>.json for another ``--batch-size``; ddp_overhead_breakdown.json for ``--breakdown``).

``--breakdown`` times the pieces instead, without Lightning: first single-process memory passes over a gradient
of the model's size, then 2 gloo processes (torch.multiprocessing) training one copy of the model per variant,
the variants interleaved step by step (finer than blocks, so machine load hits them alike; each step a round of
the harness, medians of the per-step ratios to plain DDP): plain DDP; DDP with
the C++ built-in all-reduce comm hook (bucket copy and 1/W division no longer fused); DDP with the Python
``allreduce_hook``; the strategy's comm-hook recorder (its path with a user hook or gradient_as_bucket_view); its
default recorder (no comm hook); and the default recorder with the local-norm all-reduce but no norm passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.plugins.grad_stats_ddp import GradStatsDDPStrategy

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import (  # noqa: E402
    StepClock,
    add_output_options,
    compare_measured,
    save_results,
    summarize_rounds,
    summary_row,
    time_once,
)


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


def _fit(strategy: DDPStrategy, args: argparse.Namespace, data: TensorDataset) -> tuple[float, float]:
    """Median (CPU, wall) seconds per step on this rank, the first ``--warmup`` steps left out."""
    clock = StepClock()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock], use_distributed_sampler=True)
    trainer.fit(_Net(args.features, args.hidden, args.depth, args.classes),
                DataLoader(data, batch_size=args.batch_size, shuffle=False))
    return clock.median(args.warmup)


def _breakdown_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
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
    def step(model, opt, before, after) -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        before(loss)
        loss.backward()
        after()
        opt.step()
        opt.zero_grad()

    per_round: list[dict[str, tuple[float, float]]] = []  # one round per step: every variant once, in order
    for _ in range(args.breakdown_steps):
        measured = {}
        for name, parts in variants.items():
            dist.barrier()
            measured[name] = time_once(lambda parts=parts: step(*parts))
        per_round.append(measured)
    if rank == 0:
        skip = min(10, args.breakdown_steps // 5)
        result = summarize_rounds(per_round[skip:], names[0])
        print(f"2 gloo processes, {args.breakdown_steps} steps per variant interleaved step by step (rank 0, "
              "medians and median per-step ratios to plain DDP):")
        base = result[names[0]]["cpu_s"]
        for name, r in result.items():
            print(f"  {name:32s} wall {1e3 * r['wall_s']:7.2f} ms ({r['ratio_wall']:.3f})   "
                  f"cpu {1e3 * r['cpu_s']:7.2f} ms ({r['ratio']:.3f}, {1e3 * (r['cpu_s'] - base):+.2f} ms)")
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def _passes(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Single-process cost of one memory pass over a gradient of the model's size (hot: the same tensors again;
    cold: cycling through 12 copies, ~12x the model's size)."""
    from lightning_sgd.core import sq_norms

    def timed(f, sets: list, n: int = 60) -> float:
        """Milliseconds of one pass: n passes in a row (the first 3 untimed), CPU time."""
        for i in range(3):
            f(sets[i % len(sets)])
        return 1e3 * time_once(lambda: [f(sets[i % len(sets)]) for i in range(n)])[0] / n

    shapes = [tuple(p.shape) for p in _Net(args.features, args.hidden, args.depth, args.classes).parameters()]
    hot = [[torch.randn(s) for s in shapes]]
    cold = [[torch.randn(s) for s in shapes] for _ in range(12)]
    flat_hot = [torch.cat([g.flatten() for g in grads]) for grads in hot]
    flat_cold = [torch.cat([g.flatten() for g in grads]) for grads in cold]
    outs = [torch.empty_like(f) for f in flat_cold]
    ops = {
        "_foreach_norm over the parameter grads": (lambda grads: sq_norms(grads).sum(), hot, cold),
        "torch.dot on the flat gradient": (lambda f: torch.dot(f, f), flat_hot, flat_cold),
        "in-place division (div_)": (lambda f: f.div_(1.0), flat_hot, flat_cold),
        "copy into another buffer": (lambda f: outs[0][: f.numel()].copy_(f), flat_hot, flat_cold),
    }
    n_params = sum(f.numel() for f in flat_hot)
    print(f"one pass over {n_params / 1e6:.2f} M fp32 ({4 * n_params / 1e6:.1f} MB), 1 thread, CPU time:")
    out = {}
    for name, (f, h, c) in ops.items():
        out[name] = {"hot_ms": timed(f, h), "cold_ms": timed(f, c)}
        print(f"  {name:40s} hot {out[name]['hot_ms']:.3f} ms   cold {out[name]['cold_ms']:.3f} ms")
    return out


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
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.depth, args.steps, args.warmup, args.reps, args.breakdown_steps = 64, 1, 8, 2, 2, 10
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    n_params = sum(p.numel() for p in _Net(args.features, args.hidden, args.depth, args.classes).parameters())
    model = f"MLP {args.features}→{args.hidden}×{args.depth}→{args.classes} ({n_params / 1e6:.2f} M params)"
    if args.breakdown:
        import socket
        import tempfile

        import torch.multiprocessing as mp

        passes = _passes(args)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory(prefix="ddp_breakdown_") as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.spawn(_breakdown_worker, args=(args, port, out), nprocs=2)
            with open(out) as f:
                steps = json.load(f)
        path = save_results("ddp_overhead_breakdown", {"config": vars(args), "model": model, "passes": passes,
                                                       "steps": steps}, args)
        print(f"wrote {path}")
        return
    g = torch.Generator().manual_seed(0)
    n = 2 * args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, args.features, generator=g), torch.randint(0, args.classes, (n,), generator=g))
    # rotated rounds of two: plain, stats / stats, plain / ...: in a plain-vs-plain control run on the loaded machine
    # the second block of a pair came out 3-6% slower than the first, so each strategy goes first in half of them
    configs = {
        "DDPStrategy": lambda: _fit(DDPStrategy(), args, data),
        "GradStatsDDPStrategy": lambda: _fit(GradStatsDDPStrategy(log_grad_norms=False,
                                                                  every_n_steps=args.every_n_steps), args, data),
    }
    result = compare_measured(configs, "DDPStrategy", rounds=args.reps)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    print(f"model: {model}, batch {args.batch_size}/process, 2 CPU processes (gloo), "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {args.reps} blocks of {args.steps - args.warmup - 1} "
          f"timed steps per strategy (rank 0), every_n_steps={args.every_n_steps}")
    plain, stats = result["DDPStrategy"], result["GradStatsDDPStrategy"]
    rows = []
    for clock, key, ratio in (("wall", "wall_s", "ratio_wall"), ("cpu", "cpu_s", "ratio")):
        print(f"[{clock:4s}] DDPStrategy {1e3 * plain[key]:8.2f} ms   GradStatsDDPStrategy "
              f"{1e3 * stats[key]:8.2f} ms   ratio {stats[ratio]:.3f} (target <= 1.02)"
              + (f"   per block pair: {' '.join(f'{r:.3f}' for r in stats['ratios'])}" if clock == "cpu" else ""))
        rows.append(summary_row(
            f"DDP step time, 2 gloo processes, {model}, batch {args.batch_size}/process, every_n_steps "
            f"{args.every_n_steps} ({'wall clock' if clock == 'wall' else 'process CPU time'})",
            f"GradStatsDDPStrategy, {1e3 * stats[key]:.3g} ms", f"DDPStrategy, {1e3 * plain[key]:.3g} ms",
            stats[ratio], "≤ 1.02×", spread=stats["spread"] if clock == "cpu" else None))
    name = "ddp_overhead" if args.batch_size == 64 else f"ddp_overhead_batch{args.batch_size}"
    path = save_results(name, {"config": vars(args), "model": model, "timing": result}, args, summary=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
