"""MNIST-1D recipe: the data module and the two networks of the MNIST-1D paper (Greydanus & Kobak 2020).

The module is named ``mnist_1d`` so that it never shadows the ``mnist1d`` package when ``recipes/`` is the working
directory (jsonargparse enters a config's folder while parsing it).

The data is generated offline by :func:`lightning_sgd.data.mnist1d.generate_mnist1d`, so this recipe needs no
download. Train, val and test sets use disjoint seeds derived from one ``seed``; the generated tensors are cached
under ``cache_dir`` so a second run starts instantly.

:meth:`MNIST1DDataModule.fresh_batch` adds an unlimited stream of fresh i.i.d. training examples (the
``fresh_batch`` protocol of :mod:`lightning_sgd.bootstrap`), which the :class:`~lightning_sgd.callbacks.DeepBootstrap`
twin trains on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.bootstrap import ChunkedStream
from lightning_sgd.data.mnist1d import NUM_CLASSES, SEQUENCE_LENGTH, generate_mnist1d, read_mnist1d_cache
from lightning_sgd.resumable import EpochSampler, ResumableDataLoader, trainer_epoch

_SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1  # bump when the generator or normalization changes


def split_seed(seed: int, stream: int) -> int:
    """Independent 32-bit seed for stream ``stream`` (0 train, 1 val, 2 test; 100+ shuffling) of run ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


_FRESH_STREAM = 3  # the fresh-sample stream's entropy tag (split_seed uses 0-2 for the splits, 100+ for shuffling)


def fresh_chunk_seed(seed: int, chunk: int) -> int:
    """32-bit seed of chunk ``chunk`` of run ``seed``'s fresh-sample stream, never equal to a train/val/test seed."""
    split_seeds = {split_seed(seed, stream) for stream in range(len(_SPLITS))}
    salt = 0
    while True:  # a 32-bit collision with a split seed has probability ~1e-9 per chunk; skip it deterministically
        value = int(np.random.SeedSequence([seed, _FRESH_STREAM, chunk, salt]).generate_state(1)[0])
        if value not in split_seeds:
            return value
        salt += 1


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D train/val/test sets, i.i.d. from the same generator, normalized with the train set's statistics.

    Args:
        num_train: training examples (the paper uses 4000).
        num_val: validation examples.
        num_test: test examples (the paper uses 1000).
        batch_size: per-device training batch size; evaluation uses ``eval_batch_size``.
        eval_batch_size: batch size for val/test loaders.
        seed: determines every split (and any fresh-sample stream) of this data module.
        cache_dir: where generated tensors are cached; ``None`` disables the cache.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        fresh_chunk_size: the fresh-sample stream (:meth:`fresh_batch`) is generated, seeded and cached in chunks of
            this many examples (generation runs at roughly 7k examples/s; cached chunks load instantly).
    """

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 1000,
        num_test: int = 1000,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        seed: int = 0,
        cache_dir: str | None = ".data/mnist1d",
        num_workers: int = 0,
        fresh_chunk_size: int = 5000,
    ) -> None:
        super().__init__()
        for name, value in (("num_train", num_train), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("fresh_chunk_size", fresh_chunk_size)):
            if value < 1:
                raise ValueError(f"MNIST1DDataModule: {name} must be >= 1, got {value}.")
        for name, value in (("num_val", num_val), ("num_test", num_test), ("num_workers", num_workers)):
            if value < 0:
                raise ValueError(f"MNIST1DDataModule: {name} must be >= 0, got {value}.")
        self.save_hyperparameters()
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.num_classes = NUM_CLASSES
        self.input_shape = (SEQUENCE_LENGTH,)
        self.tensors: dict[str, tuple[Tensor, Tensor]] = {}
        self.mean: float | None = None
        self.std: float | None = None
        self.fresh_chunk_size = fresh_chunk_size
        self._fresh: ChunkedStream | None = None

    # ----------------------------------------------------------------------------------------------- generation
    def _generate(self, split: str, num_samples: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        if seed is None:
            seed = split_seed(self.seed, _SPLITS.index(split))
        if self.cache_dir is None:
            return generate_mnist1d(num_samples, seed)
        key = hashlib.sha1(f"v{_CACHE_VERSION}-{num_samples}-{seed}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"{split}-{num_samples}-{key}.pt"
        if path.exists():
            return read_mnist1d_cache(path, num_samples)
        x, y = generate_mnist1d(num_samples, seed)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # unique temporary name + atomic rename: a killed run never leaves a truncated file, and processes that
        # share the folder (DDP ranks, nodes on a shared filesystem) may all write the same entry safely
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save((x, y), tmp)
        tmp.replace(path)
        return x, y

    def normalize(self, x: Tensor) -> Tensor:
        """Apply the training set's normalization (available after ``setup``)."""
        if self.mean is None or self.std is None:
            raise RuntimeError("MNIST1DDataModule.normalize needs setup() to have run first.")
        return (x - self.mean) / self.std

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        x_train, y_train = self._generate("train", self.num_train)
        self.mean, self.std = float(x_train.mean()), float(x_train.std())
        self.tensors["train"] = (self.normalize(x_train), y_train)
        for split, n in (("val", self.num_val), ("test", self.num_test)):
            x, y = self._generate(split, n)
            self.tensors[split] = (self.normalize(x), y)

    # ----------------------------------------------------------------------------------- fresh-sample stream
    def fresh_batch(self, start: int, size: int) -> tuple[Tensor, Tensor]:
        """Examples ``start .. start + size − 1`` of an unlimited stream of fresh i.i.d. training examples.

        The ``fresh_batch`` protocol of :mod:`lightning_sgd.bootstrap`: new draws from the same generator, seeded per
        chunk of ``fresh_chunk_size`` examples (:func:`fresh_chunk_seed`, disjoint from the train/val/test seeds),
        normalized with the training set's statistics, cached like the splits. A pure function of ``(start, size)``.
        Needs :meth:`setup` first (for the normalization).

        Returns ``(x, y)``: float32 ``(size, 40)`` and int64 ``(size,)``, like a training batch.
        """
        if self.mean is None:
            raise RuntimeError("MNIST1DDataModule.fresh_batch needs setup() to have run first.")
        if self._fresh is None:
            self._fresh = ChunkedStream(self._fresh_chunk, self.fresh_chunk_size)
        x, y = self._fresh.take(start, size)
        return x, y

    def _fresh_chunk(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self._generate("fresh", self.fresh_chunk_size, seed=fresh_chunk_seed(self.seed, index))
        return self.normalize(x), y

    # ---------------------------------------------------------------------------------------------- dataloaders
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        x, y = self.tensors[split]
        if len(y) == 0:
            raise ValueError(f"MNIST1DDataModule: the {split} split is empty; set num_{split} >= 1 to use it.")
        dataset = TensorDataset(x, y)
        if not shuffle:
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers)
        # order a function of (seed, epoch); the checkpoint records the place in the epoch (exact resume anywhere)
        sampler = EpochSampler(len(y), seed=split_seed(self.seed, 100 + _SPLITS.index(split)),
                               current_epoch=trainer_epoch(self))
        return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                                   drop_last=len(y) >= batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


class MNIST1DMLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 → hidden → hidden → 10 with ReLU (hidden = 100 in the paper)."""

    def __init__(self, hidden: int = 100, num_classes: int = NUM_CLASSES, input_length: int = SEQUENCE_LENGTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_length, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, 40) -> (B, 10)
        return self.net(x.flatten(1))


class MNIST1DCNN(nn.Module):
    """The MNIST-1D paper's CNN: three strided Conv1d layers (25 channels) and a linear head (~5.2k parameters)."""

    def __init__(self, channels: int = 25, num_classes: int = NUM_CLASSES, input_length: int = SEQUENCE_LENGTH) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        length = input_length
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 40) -> (B, 1, 40) -> (B, C, 5) -> (B, 10)
        h = self.features(x.reshape(x.shape[0], 1, x.shape[-1]))
        return self.head(h.flatten(1))
