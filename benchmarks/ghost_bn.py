"""Ghost batch norm forward+backward: vectorized GhostBatchNorm vs nn.BatchNorm2d vs a Python loop over chunks.

A CIFAR ResNet-style basic block (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU), batch 512, ghost size 32. Times
the BN layer alone and the whole block, side by side in one process (benchmarks/_harness.py: rotated rounds, medians,
process CPU time; wall time on CUDA), prints ratios to nn.BatchNorm2d and writes benchmarks/results/ghost_bn.json.

    python benchmarks/ghost_bn.py                      # CPU, 16 channels at 32x32 (ResNet32's first stage)
    python benchmarks/ghost_bn.py --device cuda --channels 64
    python benchmarks/ghost_bn.py --quick               # smoke test: tiny sizes, results to a temporary directory
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_sgd.plugins.ghost_batchnorm import GhostBatchNorm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, compare, save_results, summary_row  # noqa: E402


class ChunkLoopBN(nn.BatchNorm2d):
    """The naive ghost BN: one nn.BatchNorm2d call per chunk, then concatenate."""

    def __init__(self, num_features: int, ghost_batch_size: int) -> None:
        super().__init__(num_features)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return torch.cat([super(ChunkLoopBN, self).forward(chunk) for chunk in x.split(self.ghost_batch_size)])


def make_bn(kind: str, channels: int, ghost: int) -> nn.Module:
    if kind == "nn.BatchNorm2d":
        return nn.BatchNorm2d(channels)
    if kind == "GhostBatchNorm":
        return GhostBatchNorm(channels, ghost_batch_size=ghost)
    return ChunkLoopBN(channels, ghost)


class Block(nn.Module):
    def __init__(self, channels: int, bn: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = bn()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward+backward of ``module`` on a fresh leaf copy of ``x``."""
    def run() -> None:
        module(x.detach().requires_grad_(True)).sum().backward()
        module.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--ghost", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="runs per implementation per round (median)")
    parser.add_argument("--rounds", type=int, default=5, help="rotated rounds")
    parser.add_argument("--device", default="cpu")
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.ghost, args.size, args.repeats, args.rounds = 64, 16, 8, 2, 1
    torch.manual_seed(0)
    device = torch.device(args.device)
    clock = "wall" if device.type == "cuda" else "cpu"
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    kinds = ["nn.BatchNorm2d", "GhostBatchNorm", "chunk loop"]
    print(f"# ghost BN fwd+bwd, batch {args.batch}, ghost {args.ghost}, {args.channels}x{args.size}x{args.size}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} "
          f"rotated rounds x median of {args.repeats}, {clock} clock")
    print(f"{'what':<12s} {'implementation':<16s} {'ms':>9s} {'vs nn.BatchNorm2d':>18s}   per-round ratios")
    figures: dict[str, Any] = {"config": vars(args), "clock": clock}
    rows = []
    for what in ("BN layer", "block"):
        configs = {}
        for kind in kinds:
            if what == "BN layer":
                module = make_bn(kind, args.channels, args.ghost).to(device)
            else:
                torch.manual_seed(0)
                module = Block(args.channels, lambda k=kind: make_bn(k, args.channels, args.ghost)).to(device)
            configs[kind] = fwd_bwd(module, x)
        timing = compare(configs, "nn.BatchNorm2d", rounds=args.rounds, repeats=args.repeats, warmup=2, clock=clock)
        figures[what] = timing
        for kind in kinds:
            t = timing[kind]
            print(f"{what:<12s} {kind:<16s} {1e3 * t[clock + '_s']:9.2f} {t['ratio']:17.2f}x   "
                  f"{' '.join(f'{r:.2f}' for r in t['ratios'])}")
        base_ms = 1e3 * timing[kinds[0]][clock + "_s"]
        for kind in kinds[1:]:
            t = timing[kind]
            rows.append(summary_row(
                f"ghost BN fwd+bwd, {what}, batch {args.batch}, ghost {args.ghost}, "
                f"{args.channels}x{args.size}x{args.size}; time ratio to nn.BatchNorm2d",
                f"{kind}, {1e3 * t[clock + '_s']:.3g} ms", f"nn.BatchNorm2d, {base_ms:.3g} ms",
                t["ratio"], "(comparison only)", spread=t["spread"]))
    path = save_results("ghost_bn", figures, args, summary=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
