"""CIFAR-10 in its python distribution format (Krizhevsky 2009): pickled batches of uint8 rows.

``cifar-10-python.tar.gz`` unpacks to ``cifar-10-batches-py/`` holding ``data_batch_1`` ... ``data_batch_5`` and
``test_batch``. Each is a pickled dict with ``b"data"``: a ``(10000, 3072)`` uint8 array (1024 red, then green,
then blue values of a 32×32 image, row-major) and ``b"labels"``: a list of ints in 0..9.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it: tar xzf cifar-10-python.tar.gz)"
FOLDER = "cifar-10-batches-py"


def find_cifar10_dir(root: str | Path) -> Path:
    """``root`` itself or ``root/cifar-10-batches-py``, whichever holds the batch files."""
    root = Path(root)
    for candidate in (root, root / FOLDER):
        if (candidate / TRAIN_BATCHES[0]).exists():
            return candidate
    expected = ", ".join(TRAIN_BATCHES + TEST_BATCHES)
    raise FileNotFoundError(
        f"CIFAR-10: expected {expected} under {root} or {root / FOLDER}. Download {SOURCE} and pass "
        "--data.init_args.root=<the folder that holds cifar-10-batches-py>."
    )


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry.get(b"labels", entry.get(b"fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}.")
    return data.reshape(-1, 3, 32, 32), labels


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a batch in the distribution format (``images`` (N, 3, 32, 32) uint8); used by tests."""
    entry = {b"batch_label": b"generated", b"data": np.asarray(images, np.uint8).reshape(len(images), 3072),
             b"labels": [int(v) for v in labels], b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def load_cifar10(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` of ``split`` ("train": 50k, "test": 10k)."""
    folder = find_cifar10_dir(root)
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10: {', '.join(missing)} missing under {folder}. Download {SOURCE}.")
    parts = [read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)
