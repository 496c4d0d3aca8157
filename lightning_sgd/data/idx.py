"""MNIST / Fashion-MNIST in their distribution format: IDX files, gzip-compressed (LeCun et al.; Xiao et al. 2017).

An IDX file is a big-endian header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` uint32 dimension sizes, then
the data in row-major order. MNIST and Fashion-MNIST ship four such files each, with the same names:
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``. The reader recognises gzip by its magic bytes, not the file name (some browsers
unpack a download and keep the ``.gz`` name).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from lightning_sgd.data.errors import bad_file, redownload

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
NUM_CLASSES = 10  # MNIST digits 0-9; Fashion-MNIST's ten garment classes
IMAGE_SHAPE = (28, 28)
FORMAT = ("an IDX file (optionally gzip-compressed): bytes 0x00 0x00 <dtype code> <ndim>, ndim big-endian uint32 "
          "sizes, then the data")
_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}


def _read_bytes(path: Path, source: str) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the suffix says)."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise bad_file(path, f"the gzip stream is truncated or corrupt ({err})", FORMAT, redownload(source)) from err


def read_idx(path: str | Path, source: str = "the data set's website") -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a numpy array of its stored shape and dtype.

    A truncated, corrupt or non-IDX file raises :class:`~lightning_sgd.data.errors.DataFileError` naming ``path``
    and telling the user to download it again from ``source``.
    """
    path = Path(path)
    data = _read_bytes(path, source)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise bad_file(path, f"not an IDX file (the first two bytes must be zero, got {data[:2]!r})", FORMAT,
                       redownload(source))
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise bad_file(path, f"unknown IDX data type code 0x{code:02x}", FORMAT, redownload(source))
    if len(data) < 4 + 4 * ndim:
        raise bad_file(path, f"the header is truncated ({len(data)} bytes, {ndim} dimensions need {4 + 4 * ndim})",
                       FORMAT, redownload(source))
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise bad_file(path, f"header says shape {shape} ({expected} bytes) but the file holds {len(body)} bytes",
                       FORMAT, redownload(source))
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
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train" or "test") from ``root``.

    Missing files raise ``FileNotFoundError``; files of the wrong shape or dtype, image and label counts that
    differ, or a label outside 0..9 raise :class:`~lightning_sgd.data.errors.DataFileError` naming the file.
    """
    root = Path(root)
    images_name, labels_name = IDX_FILES[split]
    files = [images_name, labels_name]
    source = IDX_SOURCES.get(dataset, "the data set's website")
    if not all((root / f).exists() for f in files):
        raise FileNotFoundError(missing_files_message(root, [f for s in IDX_FILES.values() for f in s], dataset,
                                                      source))
    images_path, labels_path = root / images_name, root / labels_name
    images, labels = read_idx(images_path, source), read_idx(labels_path, source)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise bad_file(images_path, f"holds {images.dtype} of shape {images.shape}", f"{dataset} images: uint8 of "
                       f"shape (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]})", redownload(source))
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise bad_file(labels_path, f"holds {labels.dtype} of shape {labels.shape}", f"{dataset} labels: uint8 of "
                       "shape (N,)", redownload(source))
    if len(images) != len(labels):
        raise bad_file(labels_path, f"holds {len(labels)} labels but {images_path} holds {len(images)} images",
                       "one label per image", redownload(source))
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise bad_file(labels_path, f"label {int(labels[bad])} at index {bad} is out of range",
                       f"{dataset} labels in 0..{NUM_CLASSES - 1}", redownload(source))
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
