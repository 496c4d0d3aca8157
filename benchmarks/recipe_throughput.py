"""Training throughput (samples/s) of recipes vs a plain PyTorch loop with the same model, data and batch size.

Side by side in one process, in the shared harness's rotated rounds (recipe, plain / plain, recipe / ...) so that
load changes on a shared machine hit both; prints the median over rounds of the per-round throughput ratio (target:
recipe >= 0.9x plain) and writes benchmarks/results/recipe_throughput.json (recipe_throughput_cuda.json on a GPU).

- Recipe: ``pl.Trainer.fit`` of the recipe's LightningModule (``ClassificationModule``, which also computes and
  logs loss and accuracy every step) and DataModule (files in the standard format, generated synthetically: the
  content does not change the speed), no logger / checkpointing / progress bar.
- Plain: the same network, the same tensors on the same device, the same batched on-device augmentation, the same
  optimizer; a ``for`` loop of forward, cross-entropy, backward, step.

Timing starts after ``--warmup`` steps and ends after ``--steps`` more (CUDA synchronized): the recipe's steps
through benchmarks/_harness.py's StepClock, the loop's through its time_once.

    python benchmarks/recipe_throughput.py                  # CPU, both recipes
    python benchmarks/recipe_throughput.py --device cuda --steps 200 --batch-size 512
    python benchmarks/recipe_throughput.py --quick     # smoke test: 2 steps of batch 16, results to a temp dir
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from lightning_sgd.data import synthetic
from lightning_sgd.recipes import (
    CIFAR10DataModule,
    CifarResNet,
    ClassificationModule,
    MNISTDataModule,
    SimpleCNN,
)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import StepClock, add_output_options, compare_measured, save_results, summary_row, time_once  # noqa: E402


def _network(name: str) -> torch.nn.Module:
    return SimpleCNN() if name == "simple_cnn" else CifarResNet(depth=8, batch_norm=False)


def _datamodule(name: str, root: Path, batch_size: int, device: str) -> pl.LightningDataModule:
    if name == "simple_cnn":
        return MNISTDataModule(root=str(root / "mnist"), batch_size=batch_size, num_val=100, device=device)
    return CIFAR10DataModule(root=str(root / "cifar"), batch_size=batch_size, num_val=100, device=device)


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def run_recipe(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(CPU, wall) seconds of ``--steps`` Trainer steps after ``--warmup`` steps."""
    torch.manual_seed(0)
    module = ClassificationModule(_network(name), num_classes=10, optimizer=_optimizer)
    datamodule = _datamodule(name, root, args.batch_size, "auto")
    clock = StepClock()
    trainer = pl.Trainer(accelerator=device.type, devices=1, max_steps=args.warmup + args.steps + 1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock], precision=args.precision)
    trainer.fit(module, datamodule=datamodule)
    steps = clock.steps(args.warmup)
    return sum(s[0] for s in steps), sum(s[1] for s in steps)


def run_plain(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(CPU, wall) seconds of ``--steps`` steps of a plain loop after ``--warmup`` steps."""
    torch.manual_seed(0)
    model = _network(name).to(device)
    optimizer = _optimizer(model.parameters())
    datamodule = _datamodule(name, root, args.batch_size, str(device))
    datamodule.setup("fit")
    tensors = datamodule.tensors["train"]  # the same tensors, on the same device
    images, labels = (t.to(device) for t in tensors)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    model.train()

    def batches() -> Iterator[torch.Tensor]:  # index batches, epoch after epoch
        while True:
            order = torch.randperm(len(labels), generator=generator).to(device)
            for i in range(len(labels) // args.batch_size):
                yield order[i * args.batch_size : (i + 1) * args.batch_size]

    indices = batches()

    def step() -> None:
        index = next(indices)
        x, y = datamodule.transform((images[index], labels[index]), True, generator)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    return time_once(lambda: [step() for _ in range(args.steps)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["simple_cnn", "resnet8"], choices=["simple_cnn", "resnet8"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="rotated rounds of (recipe, plain)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="the ratio's clock (wall: samples/s as a user sees them; cpu: robust to other jobs)")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.repeats = 16, 2, 1, 1
    device = torch.device(args.device)
    pl.seed_everything(0, verbose=False)
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    figures: dict[str, Any] = {"config": vars(args)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        needed = (args.warmup + args.steps + 1) * args.batch_size + 100
        synthetic.write_mnist(root / "mnist", num_train=needed, num_test=16)
        synthetic.write_cifar10(root / "cifar", per_batch=-(-needed // 5), seed=1)
        print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch threads={torch.get_num_threads()}, batch={args.batch_size}, steps={args.steps} "
              f"(+{args.warmup} warmup), precision={args.precision}, {args.clock} clock")
        for name in args.recipes:
            configs = {"recipe": lambda n=name: run_recipe(n, root, args, device),
                       "plain": lambda n=name: run_plain(n, root, args, device)}
            timing = compare_measured(configs, "plain", rounds=args.repeats, clock=args.clock)
            recipe, plain = (args.steps * args.batch_size / timing[k]["wall_s"] for k in ("recipe", "plain"))
            per_round = [1 / r for r in timing["recipe"]["ratios"]]  # throughput ratios
            ratio = 1 / timing["recipe"]["ratio"]
            print(f"{name:>10s}: recipe {recipe:9.1f} samples/s | plain loop {plain:9.1f} samples/s (wall, medians) "
                  f"| throughput ratio recipe/plain {ratio:.3f} (median; rounds "
                  f"{' '.join(f'{r:.3f}' for r in per_round)})")
            figures[name] = {"recipe_samples_per_s": recipe, "plain_samples_per_s": plain, "ratio": ratio,
                             "ratios": per_round, "timing": timing}
            rows.append(summary_row(
                f"training throughput, {name} recipe, batch {args.batch_size}, {args.device}, {args.precision}; "
                f"throughput ratio recipe / plain ({args.clock} clock)", f"Lightning recipe, {recipe:.4g} samples/s",
                f"plain PyTorch loop, {plain:.4g} samples/s", ratio, "≥ 0.9×",
                spread=[min(per_round), max(per_round)]))
    path = save_results("recipe_throughput" if args.device == "cpu" else f"recipe_throughput_{device.type}",
                        figures, args, summary=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
