"""DataModules of the benchmark recipes: MNIST, Fashion-MNIST, CIFAR-10, Penn Treebank, LM1B, ImageNet.

Each reads the standard distribution files from ``root`` (see ``lightning_sgd.data``) and raises an error naming
the expected files and where to get them when they are missing.

Fast path: the small data sets (MNIST, Fashion-MNIST, CIFAR-10, PTB) are kept as tensors on the training device
(:func:`tensor_dataloader`): the DataLoader fetches a whole mini-batch with one indexing operation
(:class:`TensorBatchDataset`) and its ``collate_fn`` augments the whole batch on the device (random crop with
padding + horizontal flip for CIFAR-10), as fast CIFAR trainers do, instead of per-sample DataLoader workers. It
stays a plain ``DataLoader``, so Lightning shards it under DDP, and batches come out ready to use (normalized
floats), so callbacks that draw their own batches from ``trainer.train_dataloader`` see what ``training_step``
sees.

Exact resume: every training loader is a :class:`~lightning_sgd.resumable.ResumableDataLoader` over an
:class:`~lightning_sgd.resumable.EpochSampler`, so the data order is a function of ``(seed, epoch)`` and a checkpoint
records how far into the epoch training got; the random augmentation of a batch (or, for ImageNet, of an example) is
seeded from ``(seed, epoch, position)`` instead of a generator shared across the run. A run resumed from any step
sees exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_sgd.data.cifar import load_cifar10
from lightning_sgd.data.idx import load_idx_split
from lightning_sgd.data.imagenet import MEAN as IMAGENET_MEAN
from lightning_sgd.data.imagenet import STD as IMAGENET_STD
from lightning_sgd.data.imagenet import ImageFolderDataset, list_image_folder, worker_init_fn
from lightning_sgd.data.text import encode_shards, lm1b_shards, lm1b_vocab, load_ptb
from lightning_sgd.resumable import EpochSampler, ResumableDataLoader, epoch_seed, trainer_epoch

Batch = tuple[Tensor, ...]


# ------------------------------------------------------------------------------------------ on-device batching
def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator | None = None,
                     flip: bool = True) -> Tensor:
    """Batched augmentation on the images' device: zero-pad by ``padding``, crop back at a random offset per image,
    and flip each image horizontally with probability 1/2. ``images``: ``(B, C, H, W)``."""
    b, c, h, w = images.shape
    device = images.device
    out = images
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(device)
        rows = (offsets[0][:, None] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (offsets[1][:, None] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
        batch_idx = torch.arange(b, device=device)[:, None, None, None]
        chan_idx = torch.arange(c, device=device)[None, :, None, None]
        out = padded[batch_idx, chan_idx, rows, cols]  # (B, C, H, W)
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(device)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


class TensorBatchDataset(Dataset):
    """A map-style dataset over tensors that may live on the GPU, fetched a whole batch at a time.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices, which indexes every tensor once (no per-sample
    Python work, no worker processes); ``dataset[i]`` still gives one example, so tools that build their own
    batches with ``loader.collate_fn([dataset[i] for i in ...])`` keep working.
    """

    def __init__(self, *tensors: Tensor) -> None:
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError("TensorBatchDataset: tensors must have the same first dimension.")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> _IndexedBatch:
        index = torch.as_tensor(indices, device=self.tensors[0].device)
        return _IndexedBatch(tuple(t[index] for t in self.tensors))


class _IndexedBatch(tuple):
    """The already-stacked tensors of one batch (what ``TensorBatchDataset.__getitems__`` returns)."""


class BatchTransform:
    """``collate_fn`` of the tensor loaders: stack (unless already stacked), then apply ``transform`` to the batch.

    ``transform(tensors, generator)`` runs on the tensors' device; ``generator`` drives the random augmentation: a
    CPU ``torch.Generator`` seeded by ``(seed, epoch, rank, position)`` of the batch that ``sampler`` (the loader's
    :class:`EpochSampler`, drawn in this process) has just drawn, so a batch's augmentation depends only on where it
    sits in the data order and a resumed run repeats it exactly. ``None`` without a sampler (evaluation).
    """

    def __init__(self, transform: Callable[[tuple[Tensor, ...], torch.Generator | None], Batch],
                 seed: int = 0, sampler: EpochSampler | None = None) -> None:
        self.transform, self.seed, self.sampler = transform, seed, sampler

    def generator(self) -> torch.Generator | None:
        """The augmentation generator of the batch being collated (``None`` without a sampler)."""
        if self.sampler is None:
            return None
        run = self.sampler.drawing
        keys = (run.epoch, self.sampler.rank, run.position) if run is not None else (-1, self.sampler.rank)
        return torch.Generator().manual_seed(epoch_seed(self.seed, *keys))

    def __call__(self, samples: Any) -> Batch:
        if isinstance(samples, _IndexedBatch):
            batch = tuple(samples)
        else:  # a list of single examples
            batch = tuple(torch.stack(column) for column in zip(*samples))
        return self.transform(batch, self.generator())


def tensor_dataloader(tensors: tuple[Tensor, ...], batch_size: int, shuffle: bool,
                      transform: Callable[[tuple[Tensor, ...], torch.Generator | None], Batch],
                      device: torch.device | str = "cpu", seed: int = 0,
                      current_epoch: Callable[[], int | None] | None = None) -> DataLoader:
    """A ``DataLoader`` over tensors moved to ``device`` once, fetching and augmenting whole batches there.

    It is a ``DataLoader`` (``num_workers=0``: the augmentation reads the sampler in this process), so callbacks
    that read ``trainer.train_dataloader.dataset`` work unchanged. Training loaders (``shuffle=True``) are a
    :class:`ResumableDataLoader` over an :class:`EpochSampler` seeded by ``seed`` (sharded over the DDP ranks),
    drop the last incomplete batch and augment with generators derived from ``seed + 1``; evaluation loaders keep
    the order and Lightning shards them under DDP.
    """
    dataset = TensorBatchDataset(*(t.to(device) for t in tensors))
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                          collate_fn=BatchTransform(transform))
    sampler = EpochSampler(len(dataset), seed=seed, current_epoch=current_epoch)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler,
                               drop_last=len(dataset) >= batch_size, num_workers=0,
                               collate_fn=BatchTransform(transform, seed + 1, sampler))


class TensorDataModule(pl.LightningDataModule):
    """Base for data sets held as tensors: subclasses fill ``self.tensors[split]`` in ``load`` and define ``transform``.

    Args:
        root: folder with the data set's distribution files.
        batch_size: per-device training batch size.
        eval_batch_size: batch size of the validation and test loaders.
        num_val: training examples held out (the last ones) as the validation set; the test set is the official one.
        device: where the tensors live: ``"auto"`` (the Trainer's device) or e.g. ``"cpu"``.
        seed: shuffling and augmentation seed.
    """

    def __init__(self, root: str = ".data", batch_size: int = 128, eval_batch_size: int = 1000, num_val: int = 5000,
                 device: str = "auto", seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}.")
        if num_val < 0:
            raise ValueError(f"num_val must be >= 0, got {num_val}.")
        self.root, self.batch_size, self.eval_batch_size = Path(root), batch_size, eval_batch_size
        self.num_val, self.device_name, self.seed = num_val, device, seed
        self.tensors: dict[str, tuple[Tensor, ...]] = {}

    # subclasses -------------------------------------------------------------------------------------------------
    def load(self) -> None:
        raise NotImplementedError

    def transform(self, batch: tuple[Tensor, ...], train: bool, generator: torch.Generator | None) -> Batch:
        return batch

    # helpers ----------------------------------------------------------------------------------------------------
    def split_off_val(self, tensors: tuple[Tensor, ...]) -> None:
        n = len(tensors[0])
        if self.num_val >= n:
            raise ValueError(f"num_val={self.num_val} leaves no training examples out of {n}.")
        self.tensors["train"] = tuple(t[: n - self.num_val] for t in tensors)
        self.tensors["val"] = tuple(t[n - self.num_val :] for t in tensors)

    def setup(self, stage: str | None = None) -> None:
        if not self.tensors:
            self.load()

    def _device(self) -> torch.device:
        if self.device_name != "auto":
            return torch.device(self.device_name)
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        tensors = self.tensors[split]
        if len(tensors[0]) == 0:
            raise ValueError(f"{type(self).__name__}: the {split} split is empty.")
        return tensor_dataloader(tensors, self.batch_size if train else self.eval_batch_size, shuffle=train,
                                 transform=lambda batch, gen: self.transform(batch, train, gen),
                                 device=self._device(), seed=self.seed, current_epoch=trainer_epoch(self))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


# ------------------------------------------------------------------------------------------------------- images
class MNISTDataModule(TensorDataModule):
    """MNIST from the four IDX ``.gz`` files in ``root``: 55,000 train / 5,000 val (the last of the official
    training set, as in Shallue et al. 2018) / 10,000 test. Batches: ``(B, 1, 28, 28)`` float, ``(B,)`` labels.

    Args:
        normalize: subtract the training mean and divide by its std; ``False`` gives pixels in [0, 1]
            (the auto-encoder's targets).
    """

    dataset = "mnist"

    def __init__(self, root: str = ".data/mnist", batch_size: int = 128, eval_batch_size: int = 1000,
                 num_val: int = 5000, normalize: bool = True, device: str = "auto", seed: int = 0) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_val, device, seed)
        self.normalize = normalize
        self.num_classes = 10
        self.mean, self.std = 0.0, 1.0

    def load(self) -> None:
        self.split_off_val(load_idx_split(self.root, "train", self.dataset))
        self.tensors["test"] = load_idx_split(self.root, "test", self.dataset)
        if self.normalize:
            pixels = self.tensors["train"][0].float() / 255
            self.mean, self.std = float(pixels.mean()), float(pixels.std())

    def transform(self, batch: tuple[Tensor, ...], train: bool, generator: torch.Generator | None) -> Batch:
        images, labels = batch
        x = images.unsqueeze(1).float().div_(255)  # (B, 1, 28, 28)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x, labels


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): the same IDX files and splits as :class:`MNISTDataModule`."""

    dataset = "fashion_mnist"

    def __init__(self, root: str = ".data/fashion_mnist", batch_size: int = 128, eval_batch_size: int = 1000,
                 num_val: int = 5000, normalize: bool = True, device: str = "auto", seed: int = 0) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_val, normalize, device, seed)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 from the python pickle batches: 45,000 train / 5,000 val (the last of the official training set,
    as in Zhang et al. 2019, Table 1) / 10,000 test. Per-channel normalization with the training statistics;
    training batches get a random crop after zero-padding by ``crop_padding`` and a random horizontal flip
    (Zhang et al. App. F.1), batched on the device. Batches: ``(B, 3, 32, 32)`` float, ``(B,)`` labels.

    Args:
        augment: apply flip + crop to training batches.
        crop_padding: zero padding (pixels per side) before the random 32×32 crop.
    """

    def __init__(self, root: str = ".data/cifar10", batch_size: int = 128, eval_batch_size: int = 1000,
                 num_val: int = 5000, augment: bool = True, crop_padding: int = 4, device: str = "auto",
                 seed: int = 0) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_val, device, seed)
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}.")
        self.augment, self.crop_padding = augment, crop_padding
        self.num_classes = 10
        self.mean = torch.zeros(1, 3, 1, 1)
        self.std = torch.ones(1, 3, 1, 1)

    def load(self) -> None:
        self.split_off_val(load_cifar10(self.root, "train"))
        self.tensors["test"] = load_cifar10(self.root, "test")
        pixels = self.tensors["train"][0].float().div_(255)
        self.mean = pixels.mean(dim=(0, 2, 3)).reshape(1, 3, 1, 1)
        self.std = pixels.std(dim=(0, 2, 3)).reshape(1, 3, 1, 1)

    def transform(self, batch: tuple[Tensor, ...], train: bool, generator: torch.Generator | None) -> Batch:
        images, labels = batch
        x = images.float().div_(255)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)  # zero padding below is then the mean colour
        if train and self.augment:
            x = random_crop_flip(x, self.crop_padding, generator)
        return x, labels


# --------------------------------------------------------------------------------------------------------- text
def token_windows(ids: np.ndarray, length: int) -> Tensor:
    """Non-overlapping windows of ``length`` tokens ``(N, length)`` int64 (the ragged tail is dropped)."""
    n = len(ids) // length
    return torch.from_numpy(np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length))


def lm_transform(batch: tuple[Tensor, ...]) -> Batch:
    (windows,) = batch
    return windows[:, :-1], windows[:, 1:]  # inputs (B, T), next-token targets (B, T)


class PTBDataModule(TensorDataModule):
    """Penn Treebank (Mikolov's ``ptb.{train,valid,test}.txt``) as independent windows of ``seq_len`` + 1 tokens.

    Batches are ``(inputs (B, T), targets (B, T))`` with ``targets`` the inputs shifted by one token. The corpus
    is cut into non-overlapping windows that are shuffled as independent examples (no hidden state carried
    between batches), so the loss is a mean of per-example losses as the measurement callbacks need.
    ``vocab_size`` (10,000 on the real data) is set after ``setup``.
    """

    def __init__(self, root: str = ".data/ptb", seq_len: int = 35, batch_size: int = 20, eval_batch_size: int = 100,
                 device: str = "auto", seed: int = 0) -> None:
        super().__init__(root, batch_size, eval_batch_size, 0, device, seed)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
        self.seq_len = seq_len
        self.vocab_size: int | None = None

    def load(self) -> None:
        ids, vocab = load_ptb(self.root)
        self.vocab_size = len(vocab)
        for split, tokens in ids.items():
            self.tensors[split] = (token_windows(tokens, self.seq_len + 1),)

    def transform(self, batch: tuple[Tensor, ...], train: bool, generator: torch.Generator | None) -> Batch:
        return lm_transform(batch)


class _TokenWindows(Dataset):
    """Windows of ``length`` tokens of a (memory-mapped) id array, as ``(inputs, targets)``."""

    def __init__(self, ids: np.ndarray, length: int) -> None:
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return len(self.ids) // self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        window = torch.from_numpy(np.asarray(self.ids[i * self.length : (i + 1) * self.length], dtype=np.int64))
        return window[:-1], window[1:]


class LM1BDataModule(pl.LightningDataModule):
    """One Billion Word (LM1B) as windows of ``seq_len`` + 1 tokens of the concatenated, ``<eos>``-separated sentences.

    Tokenizer: whitespace words + ``<eos>`` with the ``vocab_size`` most frequent words of the first
    ``vocab_shards`` training shards (see :mod:`lightning_sgd.data.text`). Token ids are cached per shard under
    ``cache_dir`` as ``.npy`` and memory-mapped, so the corpus never has to fit in memory. Validation uses held-out
    shard 1 and test held-out shard 0 (the usual LM1B test set); with a single held-out shard both use it.

    Args:
        num_train_shards: use only the first N training shards (``None``: all 99).
    """

    def __init__(self, root: str = ".data/lm1b", seq_len: int = 128, batch_size: int = 64, eval_batch_size: int = 64,
                 vocab_size: int = 32768, vocab_shards: int = 10, num_train_shards: int | None = None,
                 cache_dir: str | None = ".data/lm1b-cache", num_workers: int = 2, seed: int = 0) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1 or vocab_size < 3:
            raise ValueError("LM1BDataModule: seq_len, batch_size must be >= 1 and vocab_size >= 3.")
        self.root, self.seq_len = Path(root), seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_vocab, self.vocab_shards, self.num_train_shards = vocab_size, vocab_shards, num_train_shards
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, _TokenWindows] = {}
        self.vocab_size: int | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train, heldout = lm1b_shards(self.root)
        vocab = lm1b_vocab(train, self.max_vocab, self.vocab_shards, self.cache_dir)
        self.vocab_size = len(vocab)
        if self.num_train_shards is not None:
            train = train[: self.num_train_shards]
        splits = {"train": train, "val": heldout[1:2] or heldout[:1], "test": heldout[:1]}
        for split, shards in splits.items():
            self.datasets[split] = _TokenWindows(encode_shards(shards, vocab, self.cache_dir), self.seq_len + 1)

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        dataset, workers = self.datasets[split], dict(num_workers=self.num_workers,
                                                      persistent_workers=self.num_workers > 0)
        if not train:
            return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **workers)
        if len(dataset) == 0:
            raise ValueError(f"LM1BDataModule: the training shards hold no window of seq_len + 1 = {self.seq_len + 1} "
                             "tokens; use more shards (num_train_shards) or a smaller seq_len.")
        sampler = EpochSampler(len(dataset), self.seed, current_epoch=trainer_epoch(self))
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True, **workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# ----------------------------------------------------------------------------------------------------- ImageNet
class EpochIndexSampler(EpochSampler):
    """An :class:`EpochSampler` that yields ``(epoch, index)``, for datasets that seed each example's augmentation."""

    def __iter__(self) -> Any:
        for index in super().__iter__():
            assert self.drawing is not None
            yield self.drawing.epoch, index


class EpochSeededImageFolder(ImageFolderDataset):
    """:class:`ImageFolderDataset` whose training crop and flip of ``dataset[(epoch, index)]`` are drawn from
    ``epoch_seed(seed, epoch, index)``: a pure function of the key, whichever worker loads it and whatever was
    loaded before, so a resumed run decodes the same pixels. ``dataset[index]`` works as in the parent."""

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        if isinstance(key, tuple):
            epoch, index = key
            self._rng = random.Random(epoch_seed(self.seed, epoch, index))
            return super().__getitem__(index)
        return super().__getitem__(key)


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet from ``root/{train,val}/<wnid>/*.JPEG`` (see :mod:`lightning_sgd.data.imagenet`).

    Workers decode and crop (random-resized crop + flip for training, resize + center crop for evaluation) to uint8;
    the batch is normalized on the device after transfer. There is no separate validation split: ``val`` is the
    official validation set, also used as the test set.
    """

    def __init__(self, root: str = ".data/imagenet", image_size: int = 224, batch_size: int = 256,
                 eval_batch_size: int = 250, num_workers: int = 8, seed: int = 0) -> None:
        super().__init__()
        if image_size < 8 or batch_size < 1:
            raise ValueError("ImageNetDataModule: image_size must be >= 8 and batch_size >= 1.")
        self.root, self.image_size, self.batch_size = Path(root), image_size, batch_size
        self.eval_batch_size, self.num_workers, self.seed = eval_batch_size, num_workers, seed
        self.samples: dict[str, list] = {}
        self.classes: list[str] = []
        self.mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1) * 255

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        self.samples["train"], self.classes = list_image_folder(self.root, "train")
        self.samples["val"], _ = list_image_folder(self.root, "val", self.classes)

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        workers: dict[str, Any] = dict(num_workers=self.num_workers, worker_init_fn=worker_init_fn,
                                       persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if not train:
            dataset = ImageFolderDataset(self.samples[split], self.image_size, train=False, seed=self.seed)
            return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **workers)
        dataset = EpochSeededImageFolder(self.samples[split], self.image_size, train=True, seed=self.seed)
        sampler = EpochIndexSampler(len(dataset), seed=self.seed, current_epoch=trainer_epoch(self))
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True, **workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if images.dtype == torch.uint8:
            images = (images.float() - self.mean.to(images.device)) / self.std.to(images.device)
        return images, labels
