"""Training throughput (samples/s) of recipes vs a plain PyTorch loop with the same model, data and batch size.

Side by side in one process, alternating the two (recipe, plain, recipe, plain, ...) so that load changes on a
shared machine hit both; prints each pair and the median ratio (target: recipe >= 0.9x plain).

- Recipe: ``pl.Trainer.fit`` of the recipe's LightningModule (``ClassificationModule``, which also computes and
  logs loss and accuracy every step) and DataModule (files in the standard format, generated synthetically: the
  content does not change the speed), no logger / checkpointing / progress bar.
- Plain: the same network, the same tensors on the same device, the same batched on-device augmentation, the same
  optimizer; a ``for`` loop of forward, cross-entropy, backward, step.

Timing starts after ``--warmup`` steps and ends after ``--steps`` more (CUDA synchronized).

    python benchmarks/recipe_throughput.py                  # CPU, both recipes
    python benchmarks/recipe_throughput.py --device cuda --steps 200 --batch-size 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer(pl.Callback):
    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start = self.stop = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup + self.steps:
            _sync(self.device)
            self.stop = time.perf_counter()


def _network(name: str) -> torch.nn.Module:
    return SimpleCNN() if name == "simple_cnn" else CifarResNet(depth=8, batch_norm=False)


def _datamodule(name: str, root: Path, batch_size: int, device: str) -> pl.LightningDataModule:
    if name == "simple_cnn":
        return MNISTDataModule(root=str(root / "mnist"), batch_size=batch_size, num_val=100, device=device)
    return CIFAR10DataModule(root=str(root / "cifar"), batch_size=batch_size, num_val=100, device=device)


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def run_recipe(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> float:
    torch.manual_seed(0)
    module = ClassificationModule(_network(name), num_classes=10, optimizer=_optimizer)
    datamodule = _datamodule(name, root, args.batch_size, "auto")
    timer = _Timer(args.warmup, args.steps, device)
    trainer = pl.Trainer(accelerator=device.type, devices=1, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer], precision=args.precision)
    trainer.fit(module, datamodule=datamodule)
    return args.steps * args.batch_size / (timer.stop - timer.start)


def run_plain(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> float:
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
    total = args.warmup + args.steps
    step, start = 0, 0.0
    while step < total:
        order = torch.randperm(len(labels), generator=generator).to(device)
        for i in range(len(labels) // args.batch_size):
            if step == args.warmup:
                _sync(device)
                start = time.perf_counter()
            index = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = datamodule.transform((images[index], labels[index]), True, generator)
            with autocast:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["simple_cnn", "resnet8"], choices=["simple_cnn", "resnet8"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternating (recipe, plain) pairs")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    pl.seed_everything(0, verbose=False)
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        needed = (args.warmup + args.steps) * args.batch_size + 100
        synthetic.write_mnist(root / "mnist", num_train=needed, num_test=16)
        synthetic.write_cifar10(root / "cifar", per_batch=-(-needed // 5), seed=1)
        print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch threads={torch.get_num_threads()}, batch={args.batch_size}, steps={args.steps} "
              f"(+{args.warmup} warmup), precision={args.precision}")
        for name in args.recipes:
            ratios = []
            for r in range(args.repeats):
                recipe = run_recipe(name, root, args, device)
                plain = run_plain(name, root, args, device)
                ratios.append(recipe / plain)
                print(f"{name:>10s} pair {r}: recipe {recipe:9.1f} samples/s | plain loop {plain:9.1f} samples/s "
                      f"| ratio {recipe / plain:.3f}")
            print(f"{name:>10s} median ratio recipe/plain: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
