"""MNIST-1D generated offline (Greydanus & Kobak 2020, https://github.com/greydanus/mnist1d).

The ``mnist1d`` package's ``make_dataset`` builds one fixed set and normalizes it by its own statistics. Here we
call the same per-example ``transform`` with a private random state, so any number of disjoint i.i.d. sets (train,
val, test, and an unlimited fresh stream) come from the same generator, each fully determined by its seed, and the
caller normalizes all of them with the training set's statistics. :func:`read_mnist1d_cache` reads a generated set
back from the recipe's cache and refuses a damaged one, naming the file to delete.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lightning_sgd._extras import require
from lightning_sgd.data.errors import bad_file, delete_cache

_mnist1d = require("mnist1d.data", "MNIST-1D data (lightning_sgd.data.mnist1d)")
get_dataset_args, get_templates, _transform = _mnist1d.get_dataset_args, _mnist1d.get_templates, _mnist1d.transform

SEQUENCE_LENGTH = 40  # mnist1d default final_seq_length
NUM_CLASSES = 10
CACHE_FORMAT = (f"a torch.save file of the tuple (x, y): x float32 of shape (N, {SEQUENCE_LENGTH}), finite; y int64 "
                f"of shape (N,) in 0..{NUM_CLASSES - 1}")


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """mnist1d draws from numpy's global RNG: seed it for the block and restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def generate_mnist1d(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` i.i.d. MNIST-1D examples (uniform labels), unnormalized.

    Returns ``x`` float32 of shape ``(num_samples, 40)`` and ``y`` int64 of shape ``(num_samples,)``. Deterministic
    in ``seed``; different seeds give independent draws. Seeds must fit numpy's 32-bit seeding.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    args = get_dataset_args()
    templates = get_templates()
    xs = np.empty((num_samples, SEQUENCE_LENGTH), dtype=np.float64)
    with _numpy_global_seed(seed % 2**32):
        labels = np.random.randint(0, NUM_CLASSES, size=num_samples)
        for i, label in enumerate(labels):
            xs[i], _ = _transform(templates["x"][label], templates["t"], args)
    return torch.from_numpy(xs.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def read_mnist1d_cache(path: str | Path, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``num_samples`` examples as :func:`generate_mnist1d` made them, from a cache file.

    The file is read with ``torch.load(weights_only=True)`` (tensors only, no code runs) after every record of the
    zip archive ``torch.save`` writes is checked against its CRC-32, so flipped bytes in the tensor data are caught
    too. A truncated or corrupt file, a wrong shape or dtype, a non-finite input or a label outside 0..9 raises
    :class:`~lightning_sgd.data.errors.DataFileError` that names ``path`` and says to delete it.
    """
    fix = delete_cache(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC:  # 0: written with torch.serialization.config.save.compute_crc32 off
                    archive.read(record)  # raises BadZipFile on a CRC mismatch
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch.load fails in many ways on a damaged file (EOFError, RuntimeError, ...)
        raise bad_file(path, f"cannot be loaded ({type(err).__name__}: {err})", CACHE_FORMAT, fix) from err
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(t, torch.Tensor) for t in entry)):
        raise bad_file(path, f"holds a {type(entry).__name__}, not a pair of tensors", CACHE_FORMAT, fix)
    x, y = entry
    if x.dtype != torch.float32 or tuple(x.shape) != (num_samples, SEQUENCE_LENGTH):
        raise bad_file(path, f"x is {x.dtype} of shape {tuple(x.shape)} where {num_samples} examples were cached",
                       CACHE_FORMAT, fix)
    if y.dtype != torch.int64 or tuple(y.shape) != (num_samples,):
        raise bad_file(path, f"y is {y.dtype} of shape {tuple(y.shape)} where {num_samples} labels were cached",
                       CACHE_FORMAT, fix)
    out_of_range = (y < 0) | (y >= NUM_CLASSES)
    if bool(out_of_range.any()):
        bad = int(out_of_range.nonzero()[0, 0])
        raise bad_file(path, f"label {int(y[bad])} at index {bad} is out of range", CACHE_FORMAT, fix)
    if not bool(torch.isfinite(x).all()):
        raise bad_file(path, "x holds NaN or infinite values", CACHE_FORMAT, fix)
    return x, y
