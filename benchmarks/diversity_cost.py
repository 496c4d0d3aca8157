"""GradientDiversity cost: one measurement vs one training step, and peak memory vs chunk size.

Models: the MNIST-1D recipe's CNN (batch 100, ~5k parameters) and a small Transformer LM from the recipes
(2 layers, d_model 128, vocab 512, 32 tokens, batch 32, ~0.5M parameters). For each, in one process and interleaved:

- a plain PyTorch training step (forward, backward, SGD step) and one GradientDiversity measurement on the same
  batch with each engine: "auto" (layer hooks where the model allows: the CNN; the Transformer LM's tied output
  layer sends it to vmap) and "vmap" at the default chunk size (64); process CPU time (one torch thread), the ratio
  to the training step taken per rotated round and its median reported (benchmarks/_harness.py);
- per chunk size, in a fresh subprocess (Linux): the rise of the peak resident memory (VmHWM, reset before each
  measurement through /proc/self/clear_refs; big buffers mmap'ed so frees return memory) caused by one measurement,
  next to the size of one chunk of per-example gradients (chunk × #params × 4 bytes).

    python benchmarks/diversity_cost.py          # ~1 min on 2 CPU cores
    python benchmarks/diversity_cost.py --quick  # smoke test: 1 round, chunk 4, results to a temporary directory

Writes benchmarks/results/diversity_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from typing import Any

import torch

from lightning_sgd.callbacks import GradientDiversity
from lightning_sgd.recipes import MNIST1DCNN, ClassificationModule
from lightning_sgd.recipes.language import TransformerLM
from lightning_sgd.recipes.modules import LanguageModelModule

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, compare, save_results, summary_row  # noqa: E402

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


def timing(model: str, rounds: int, repeats: int) -> dict[str, Any]:
    module, batch = build(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    callbacks = {"auto": GradientDiversity(schedule=1), "vmap": GradientDiversity(schedule=1, engine="vmap")}

    def train_step() -> None:
        optimizer.zero_grad()
        module.loss(module(batch[0]), batch[1]).backward()
        optimizer.step()

    fns = {"step": train_step} | {name: (lambda cb=cb: cb.measure(module, batch)) for name, cb in callbacks.items()}
    # the warm-up call also runs the auto engine's one-time check against vmap
    out: dict[str, Any] = {"timing": compare(fns, "step", rounds=rounds, repeats=repeats, warmup=1)}
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
    parser.add_argument("--rounds", type=int, default=5, help="rotated rounds")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration per round (median)")
    parser.add_argument("--models", nargs="+", default=["cnn", "transformer"], choices=["cnn", "transformer"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--memory-worker", nargs="+", default=None, help=argparse.SUPPRESS)
    add_output_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_worker:
        memory_worker(args.memory_worker[0], [int(c) for c in args.memory_worker[1:]])
        return
    if args.quick:
        args.rounds, args.repeats, args.chunks = 1, 1, [4]
    print(f"torch={torch.__version__} threads=1 rounds={args.rounds} repeats={args.repeats}")
    figures: dict[str, Any] = {"config": vars(args)}
    rows = []
    for model in args.models:
        t = timing(model, args.rounds, args.repeats)
        step, auto, vmap = (t["timing"][k] for k in ("step", "auto", "vmap"))
        engine = "layer hooks" if t["hooks"] else "fell back to vmap"
        batch = 100 if model == "cnn" else 32
        print(f"\n{model}: {t['params']:,} params, batch {batch}, delta={t['delta']:.4f}")
        print(f"  train step {1e3 * step['cpu_s']:.2f} ms; one measurement: auto engine ({engine}) "
              f"{1e3 * auto['cpu_s']:.2f} ms, ratio {auto['ratio']:.2f}x (rounds "
              f"{' '.join(f'{r:.2f}' for r in auto['ratios'])}); vmap (chunk 64) {1e3 * vmap['cpu_s']:.2f} ms, ratio "
              f"{vmap['ratio']:.2f}x")
        chunks = [c for c in args.chunks if c < batch] + [batch]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", model, *map(str, chunks)],
                              capture_output=True, text=True, check=True, env=env)
        rises = json.loads(proc.stdout.strip().splitlines()[-1])
        print("  vmap engine, peak memory of one measurement per chunk size:")
        print(f"  {'chunk':>6s} {'peak RSS rise (MB)':>20s} {'chunk x params x 4B (MB)':>26s}")
        memory = {}
        for chunk in chunks:
            memory[chunk] = {"peak_rss_rise_mb": rises[str(chunk)],
                             "chunk_gradients_mb": chunk * t["params"] * 4 / 2**20}
            print(f"  {chunk:6d} {rises[str(chunk)]:20.1f} {memory[chunk]['chunk_gradients_mb']:26.1f}")
        figures[model] = {"params": t["params"], "batch": batch, "diversity": t["delta"], "auto_engine": engine,
                          "timing": t["timing"], "memory": memory}
        label = "MNIST-1D CNN, batch 100" if model == "cnn" else "Transformer LM, batch 32"
        for name, what in (("auto", f"auto engine ({engine})"), ("vmap", "vmap engine, chunk 64")):
            x = t["timing"][name]
            rows.append(summary_row(f"gradient diversity, one measurement / one training step, {label}",
                                    f"{what}, {1e3 * x['cpu_s']:.3g} ms",
                                    f"training step, {1e3 * step['cpu_s']:.3g} ms",
                                    x["ratio"], "(figures only)", spread=x["spread"]))
    path = save_results("diversity_cost", figures, args, summary=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
