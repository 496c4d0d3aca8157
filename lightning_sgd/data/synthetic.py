"""Write small random data sets in the exact distribution formats the recipe loaders read.

For tests, benchmarks (throughput does not depend on the pixels) and smoke-testing a recipe without downloading::

    python -m lightning_sgd.data.synthetic cifar10 /tmp/fake-cifar --per-batch 64
    lightning-sgd fit --config recipes/resnet8_cifar10.yaml --data.init_args.root=/tmp/fake-cifar \
        --data.init_args.num_val=64 --trainer.fast_dev_run=true
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lightning_sgd._extras import require
from lightning_sgd.data.cifar import FOLDER, TEST_BATCHES, TRAIN_BATCHES, write_cifar_batch
from lightning_sgd.data.idx import IDX_FILES, write_idx
from lightning_sgd.data.text import LM1B_HELDOUT, LM1B_TRAIN, PTB_FILES

_WORDS = [f"w{i}" for i in range(200)]


def write_mnist(root: str | Path, num_train: int = 64, num_test: int = 32, seed: int = 0) -> Path:
    """The four MNIST/Fashion-MNIST IDX ``.gz`` files with random 28×28 uint8 images and labels 0..9."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("test", num_test)):
        images_name, labels_name = IDX_FILES[split]
        write_idx(root / images_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / labels_name, rng.integers(0, 10, n, dtype=np.uint8))
    return root


def write_cifar10(root: str | Path, per_batch: int = 16, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with 5 training batches and a test batch of ``per_batch`` images each."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_BATCHES + TEST_BATCHES:
        write_cifar_batch(folder / name, rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8),
                          rng.integers(0, 10, per_batch))
    return Path(root)


def _sentences(rng: np.random.Generator, n: int) -> str:
    lines = [" ".join(rng.choice(_WORDS[: rng.integers(20, len(_WORDS))], rng.integers(3, 15))) for _ in range(n)]
    return "\n".join(lines) + "\n"


def write_ptb(root: str | Path, sentences: int = 200, seed: int = 0) -> Path:
    """``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` of random sentences over a 200-word vocabulary."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in PTB_FILES.values():
        (root / name).write_text(_sentences(rng, sentences), encoding="utf-8")
    return root


def write_lm1b(root: str | Path, train_shards: int = 2, heldout_shards: int = 2, sentences: int = 200,
               seed: int = 0) -> Path:
    """LM1B's two shard folders with a few shards of random sentences."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / LM1B_TRAIN).mkdir(parents=True, exist_ok=True)
    (root / LM1B_HELDOUT).mkdir(parents=True, exist_ok=True)
    for i in range(train_shards):
        (root / LM1B_TRAIN / f"news.en-{i + 1:05d}-of-00100").write_text(_sentences(rng, sentences), encoding="utf-8")
    for i in range(heldout_shards):
        (root / LM1B_HELDOUT / f"news.en.heldout-{i:05d}-of-00050").write_text(_sentences(rng, sentences),
                                                                              encoding="utf-8")
    return root


def write_imagenet(root: str | Path, classes: int = 2, per_class: int = 3, size: tuple[int, int] = (48, 40),
                   seed: int = 0) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` with random RGB JPEGs of ``size`` (width, height)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                image = require("PIL.Image", "writing a synthetic ImageNet folder").fromarray(pixels)
                image.save(folder / f"n{c:08d}_{i}.JPEG", format="JPEG")
    return root


WRITERS = {"mnist": write_mnist, "fashion_mnist": write_mnist, "cifar10": write_cifar10, "ptb": write_ptb,
           "lm1b": write_lm1b, "imagenet": write_imagenet}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("root")
    parser.add_argument("--per-batch", type=int, default=16, help="cifar10: images per batch file")
    parser.add_argument("--num-train", type=int, default=64, help="mnist: training images")
    args = parser.parse_args(argv)
    if args.dataset == "cifar10":
        write_cifar10(args.root, per_batch=args.per_batch)
    elif args.dataset in ("mnist", "fashion_mnist"):
        write_mnist(args.root, num_train=args.num_train)
    else:
        WRITERS[args.dataset](args.root)
    print(f"wrote a synthetic {args.dataset} to {args.root}")


if __name__ == "__main__":
    main()
