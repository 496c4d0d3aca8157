"""Ghost batch norm forward+backward: vectorized GhostBatchNorm vs nn.BatchNorm2d vs a Python loop over chunks.

A CIFAR ResNet-style basic block (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU), batch 512, ghost size 32. Times
the BN layer alone and the whole block, side by side in one process, and prints ratios to nn.BatchNorm2d.

    python benchmarks/ghost_bn.py                      # CPU, 16 channels at 32x32 (ResNet32's first stage)
    python benchmarks/ghost_bn.py --device cuda --channels 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_sgd.plugins.ghost_batchnorm import GhostBatchNorm


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


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one forward+backward."""
    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize()

    times = []
    for i in range(warmup + repeats):
        xin = x.detach().requires_grad_(True)
        sync()
        start = time.perf_counter()
        module(xin).sum().backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--ghost", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    kinds = ["nn.BatchNorm2d", "GhostBatchNorm", "chunk loop"]
    print(f"# ghost BN fwd+bwd, batch {args.batch}, ghost {args.ghost}, {args.channels}x{args.size}x{args.size}, "
          f"device {args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'what':<12s} {'implementation':<16s} {'ms':>9s} {'vs nn.BatchNorm2d':>18s}")
    for what in ("BN layer", "block"):
        base = None
        for kind in kinds:
            if what == "BN layer":
                module = make_bn(kind, args.channels, args.ghost).to(device)
            else:
                torch.manual_seed(0)
                module = Block(args.channels, lambda k=kind: make_bn(k, args.channels, args.ghost)).to(device)
            seconds = time_fwd_bwd(module, x, args.repeats)
            base = base or seconds
            print(f"{what:<12s} {kind:<16s} {seconds * 1e3:9.2f} {seconds / base:17.2f}x")


if __name__ == "__main__":
    main()
