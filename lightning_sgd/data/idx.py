"""MNIST / Fashion-MNIST in their distribution format: IDX files, gzip-compressed (LeCun et al.; Xiao et al. 2017).

An IDX file is a big-endian header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` uint32 dimension sizes, then
the data in row-major order. MNIST and Fashion-MNIST ship four such files each, with the same names:
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

#: the four files of an MNIST-format data set, by split
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: where to download them
IDX_SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed) into a numpy array of its stored shape and dtype."""
    path = Path(path)
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the first two bytes must be zero).")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(body)} bytes.")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``); used by tests and tools."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _DTYPES.items()}
    native = np.asarray(array)
    key = native.dtype.newbyteorder("=").str
    if key not in codes:
        raise ValueError(f"write_idx: unsupported dtype {native.dtype}.")
    code = codes[key]
    header = bytes([0, 0, code, native.ndim]) + struct.pack(f">{native.ndim}I", *native.shape)
    body = native.astype(np.dtype(_DTYPES[code])).tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(header + body)


def missing_files_message(root: Path, files: list[str], dataset: str, source: str) -> str:
    return (f"{dataset}: expected {', '.join(files)} under {root} (missing: "
            f"{', '.join(f for f in files if not (root / f).exists())}). Download them from {source} and pass "
            "--data.init_args.root=<that folder>.")


def load_idx_split(root: str | Path, split: str, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train" or "test") from ``root``."""
    root = Path(root)
    images_name, labels_name = IDX_FILES[split]
    files = [images_name, labels_name]
    if not all((root / f).exists() for f in files):
        raise FileNotFoundError(missing_files_message(root, [f for s in IDX_FILES.values() for f in s], dataset,
                                                      IDX_SOURCES.get(dataset, "the data set's website")))
    images = read_idx(root / images_name)
    labels = read_idx(root / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{dataset} {split}: images {images.shape} and labels {labels.shape} do not match.")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))
