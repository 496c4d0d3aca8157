"""Time of one EMA update per optimizer step: EMAWeights (one ``torch._foreach_lerp_``) vs Lightning's
``EMAWeightAveraging`` (``AveragedModel.update_parameters`` with ``get_ema_avg_fn``, one lerp per tensor).

Two models: a CIFAR ResNet-32-like stack (many small tensors: where per-tensor Python overhead dominates) and a
wide MLP (few large tensors: memory bound). Both callbacks average parameters and buffers. Side by side in one run.

    python benchmarks/ema_update.py
    python benchmarks/ema_update.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn

from lightning_sgd.plugins.ema_weights import EMAWeights


class Wrapped(pl.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network


def resnet32_like(width: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
    for channels in (width, 2 * width, 4 * width):
        for _ in range(5):  # 5 basic blocks per stage, 2 conv + 2 BN each
            in_ch = layers[-1].num_features if isinstance(layers[-1], nn.BatchNorm2d) else channels
            layers += [nn.Conv2d(in_ch, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)]
    layers.append(nn.Linear(4 * width, 10))
    return nn.Sequential(*layers)


def wide_mlp(width: int = 2048, depth: int = 4) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def time_updates(update, module: nn.Module, repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 3):
        with torch.no_grad():  # a stand-in for the optimizer step: the weights move between updates
            for p in module.parameters():
                p.add_(1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# EMA update per step, device {args.device} ({platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'model':<14s} {'tensors':>8s} {'params':>10s} {'Lightning ms':>13s} {'EMAWeights ms':>14s} "
          f"{'speedup':>8s}")
    for name, network in (("ResNet-32-like", resnet32_like()), ("wide MLP", wide_mlp())):
        module = Wrapped(network).to(device)
        ours = EMAWeights(decay=0.999)
        ours.setup(None, module, "fit")
        ours._update(module, 0.0)  # the first update copies; time the steady state
        theirs = EMAWeightAveraging(decay=0.999)
        theirs.setup(None, module, "fit")
        theirs._average_model.update_parameters(module)
        t_ours = time_updates(lambda o=ours, m=module: o._update(m, 0.999), module, args.repeats, device)
        t_theirs = time_updates(lambda t=theirs, m=module: t._average_model.update_parameters(m), module,
                                args.repeats, device)
        tensors = len(list(module.parameters())) + len(list(module.buffers()))
        params = sum(p.numel() for p in module.parameters())
        print(f"{name:<14s} {tensors:8d} {params:10d} {t_theirs * 1e3:13.3f} {t_ours * 1e3:14.3f} "
              f"{t_theirs / t_ours:7.1f}x")


if __name__ == "__main__":
    main()
