"""Time of one EMA update per optimizer step: EMAWeights (one ``torch._foreach_lerp_``) vs Lightning's
``EMAWeightAveraging`` (``AveragedModel.update_parameters`` with ``get_ema_avg_fn``, one lerp per tensor).

Two models: a CIFAR ResNet-32-like stack (many small tensors: where per-tensor Python overhead dominates) and a
wide MLP (few large tensors: memory bound). Both callbacks average parameters and buffers. Side by side in one run
(benchmarks/_harness.py: rotated rounds, medians of process CPU time, wall time on CUDA); the speed-up is taken
per round and its median reported. The weights do not move between timed updates (an update's arithmetic does not
depend on the values). Writes benchmarks/results/ema_update.json.

    python benchmarks/ema_update.py
    python benchmarks/ema_update.py --device cuda
    python benchmarks/ema_update.py --quick        # smoke test: tiny models, results to a temporary directory
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn

from lightning_sgd.plugins.ema_weights import EMAWeights

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, compare, save_results, summary_row  # noqa: E402


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


def updates(module: nn.Module) -> dict[str, Callable[[], object]]:
    """One steady-state update of each implementation on ``module`` (the first update, which copies, is done)."""
    ours = EMAWeights(decay=0.999)
    ours.setup(None, module, "fit")
    ours._update(module, 0.0)
    theirs = EMAWeightAveraging(decay=0.999)
    theirs.setup(None, module, "fit")
    theirs._average_model.update_parameters(module)
    return {"EMAWeightAveraging": lambda: theirs._average_model.update_parameters(module),
            "EMAWeights": lambda: ours._update(module, 0.999)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="updates per configuration per round (median)")
    parser.add_argument("--rounds", type=int, default=5, help="rotated rounds")
    parser.add_argument("--device", default="cpu")
    add_output_options(parser)
    args = parser.parse_args()
    models = {"ResNet-32-like": lambda: resnet32_like(), "wide MLP": lambda: wide_mlp()}
    if args.quick:
        args.repeats, args.rounds = 2, 1
        models = {"ResNet-32-like": lambda: resnet32_like(4), "wide MLP": lambda: wide_mlp(64, 2)}
    device = torch.device(args.device)
    print(f"# EMA update per step, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {args.rounds} rotated rounds x median of {args.repeats}")
    print(f"{'model':<14s} {'tensors':>8s} {'params':>10s} {'Lightning ms':>13s} {'EMAWeights ms':>14s} "
          f"{'speedup':>8s}   per-round speed-ups")
    figures: dict[str, dict] = {"config": vars(args)}
    rows = []
    for name, build in models.items():
        module = Wrapped(build()).to(device)
        timing = compare(updates(module), "EMAWeightAveraging", rounds=args.rounds, repeats=args.repeats,
                         warmup=3, clock="wall" if device.type == "cuda" else "cpu")
        clock = "wall_s" if device.type == "cuda" else "cpu_s"
        per_round = [1 / r for r in timing["EMAWeights"]["ratios"]]
        speedup = 1 / timing["EMAWeights"]["ratio"]
        tensors = len(list(module.parameters())) + len(list(module.buffers()))
        params = sum(p.numel() for p in module.parameters())
        ms_theirs, ms_ours = 1e3 * timing["EMAWeightAveraging"][clock], 1e3 * timing["EMAWeights"][clock]
        print(f"{name:<14s} {tensors:8d} {params:10d} {ms_theirs:13.3f} {ms_ours:14.3f} {speedup:7.1f}x   "
              f"{' '.join(f'{r:.1f}' for r in per_round)}")
        figures[name] = {"tensors": tensors, "params": params, "lightning_ms": ms_theirs, "ours_ms": ms_ours,
                         "speedup": speedup, "speedup_per_round": per_round, "timing": timing}
        rows.append(summary_row(f"EMA update per step, {name} ({tensors} tensors, {params / 1e6:.2g} M params); "
                                "speed-up (anchor time / ours)",
                                f"EMAWeights, {ms_ours:.3g} ms", f"Lightning EMAWeightAveraging, {ms_theirs:.3g} ms",
                                speedup, "(comparison only)", spread=[min(per_round), max(per_round)]))
    path = save_results("ema_update", figures, args, summary=rows, packages=("pytorch_lightning",))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
