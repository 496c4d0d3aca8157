"""GradientDiversity cost: one measurement vs one training step, and peak memory vs chunk size.

Models: the MNIST-1D recipe's CNN (batch 100, ~5k parameters) and a small Transformer LM from the recipes
(2 layers, d_model 128, vocab 512, 32 tokens, batch 32, ~0.5M parameters). For each, in one process and interleaved:

- a plain PyTorch training step (forward, backward, SGD step) and one GradientDiversity measurement on the same
  batch with each engine: "auto" (layer hooks where the model allows: the CNN; the Transformer LM's tied output
  layer sends it to vmap) and "vmap" at the default chunk size (64); median process CPU time over repeats (one
  torch thread), and their ratios;
- per chunk size, in a fresh subprocess (Linux): the rise of the peak resident memory (VmHWM, reset before each
  measurement through /proc/self/clear_refs; big buffers mmap'ed so frees return memory) caused by one measurement,
  next to the size of one chunk of per-example gradients (chunk × #params × 4 bytes).

    python benchmarks/diversity_cost.py          # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

from lightning_sgd.callbacks import GradientDiversity
from lightning_sgd.recipes import MNIST1DCNN, ClassificationModule
from lightning_sgd.recipes.language import TransformerLM
from lightning_sgd.recipes.modules import LanguageModelModule

warnings.filterwarnings("ignore")


def build(model: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if model == "cnn":
        module = ClassificationModule(MNIST1DCNN(), num_classes=10)
        batch = (torch.randn(100, 40), torch.randint(0, 10, (100,)))
    else:
        net = TransformerLM(vocab_size=512, d_model=128, num_heads=4, d_ff=512, num_layers=2, dropout=0.0,
                            max_len=64)
        module = LanguageModelModule(net)
        tokens = torch.randint(0, 512, (32, 33))
        batch = (tokens[:, :-1], tokens[:, 1:])
    return module, batch


def timing(model: str, repeats: int) -> dict[str, float]:
    module, batch = build(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    callbacks = {"auto": GradientDiversity(schedule=1), "vmap": GradientDiversity(schedule=1, engine="vmap")}

    def train_step() -> None:
        optimizer.zero_grad()
        module.loss(module(batch[0]), batch[1]).backward()
        optimizer.step()

    fns = {"step": train_step} | {name: (lambda cb=cb: cb.measure(module, batch)) for name, cb in callbacks.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (and the auto engine's one-time check against vmap)
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()  # CPU time: robust to other jobs on a shared machine (1 torch thread)
            fn()
            times[name].append(time.process_time() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["params"] = sum(p.numel() for p in module.parameters())
    out["delta"] = callbacks["auto"].diversity
    out["hooks"] = callbacks["auto"].engine_in_use == "hooks"
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(model: str, chunks: list[int]) -> None:
    """Peak RSS rise of one measurement per chunk size (Linux). Run with MALLOC_MMAP_THRESHOLD_ small, so that big
    buffers are mmap'ed and returned on free, and the peak is reset (clear_refs 5) before each measurement."""
    module, batch = build(model)
    GradientDiversity(chunk_size=1, engine="vmap").measure(module, (batch[0][:2], batch[1][:2]))  # warm vmap
    out = {}
    for chunk in chunks:
        GradientDiversity(chunk_size=chunk, engine="vmap").measure(module, batch)  # first call: one-time caches
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        GradientDiversity(chunk_size=chunk, engine="vmap").measure(module, batch)
        out[chunk] = (_status_kb("VmHWM") - base) / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--memory-worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_worker:
        memory_worker(args.memory_worker[0], [int(c) for c in args.memory_worker[1:]])
        return
    print(f"torch={torch.__version__} threads=1 repeats={args.repeats}")
    for model in ("cnn", "transformer"):
        t = timing(model, args.repeats)
        batch = 100 if model == "cnn" else 32
        print(f"\n{model}: {t['params']:,} params, batch {batch}, delta={t['delta']:.4f}")
        print(f"  train step {1e3 * t['step']:.2f} ms; one measurement: auto engine "
              f"({'layer hooks' if t['hooks'] else 'fell back to vmap'}) {1e3 * t['auto']:.2f} ms, ratio "
              f"{t['auto'] / t['step']:.2f}x; vmap (chunk 64) {1e3 * t['vmap']:.2f} ms, ratio "
              f"{t['vmap'] / t['step']:.2f}x")
        chunks = [c for c in args.chunks if c < batch] + [batch]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", model, *map(str, chunks)],
                              capture_output=True, text=True, check=True, env=env)
        rises = json.loads(proc.stdout.strip().splitlines()[-1])
        print("  vmap engine, peak memory of one measurement per chunk size:")
        print(f"  {'chunk':>6s} {'peak RSS rise (MB)':>20s} {'chunk x params x 4B (MB)':>26s}")
        for chunk in chunks:
            print(f"  {chunk:6d} {rises[str(chunk)]:20.1f} {chunk * t['params'] * 4 / 2**20:26.1f}")


if __name__ == "__main__":
    main()
