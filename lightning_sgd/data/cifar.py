"""CIFAR-10 in its python distribution format (Krizhevsky 2009): pickled batches of uint8 rows.

``cifar-10-python.tar.gz`` unpacks to ``cifar-10-batches-py/`` holding ``data_batch_1`` ... ``data_batch_5`` and
``test_batch``. Each is a pickled dict with ``b"data"``: a ``(10000, 3072)`` uint8 array (1024 red, then green,
then blue values of a 32×32 image, row-major) and ``b"labels"``: a list of ints in 0..9.

The batches are read with :class:`CifarUnpickler`, which builds only the types such a pickle holds (dicts, lists,
bytes, ints and numpy arrays), so a file that carries code (a ``__reduce__`` that calls ``os.system``, say) is
refused before anything runs.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_sgd.data.errors import bad_file, redownload

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it: tar xzf cifar-10-python.tar.gz)"
FOLDER = "cifar-10-batches-py"
NUM_CLASSES = 10
FORMAT = ('a CIFAR-10 python batch: a pickled dict with b"data", a (N, 3072) uint8 array, and b"labels", N ints in '
          "0..9")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it for ``bytes`` (``encoding="latin1"``), and nothing else."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 rebuilds bytes)")
    return codecs.encode(text, encoding)


#: every global a CIFAR-10 batch pickle may name (Python 2's numpy 1.x original, or rewritten by numpy 1.x/2.x
#: with any pickle protocol), and the object it is rebuilt with
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", name): getattr(_multiarray, name)
       for core in ("core", "_core") for name in ("_reconstruct", "scalar")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in ("core", "_core")},
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-10 batch holds and refuses every other global by name.

    Dicts, lists, tuples, bytes, strings and ints need no globals; numpy arrays, dtypes and scalars need the few
    in ``_ALLOWED_GLOBALS``. Anything else (``os.system``, ``builtins.eval``, a class of some package) raises
    ``pickle.UnpicklingError`` before it is imported, let alone called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, "
                "ints and numpy arrays, so this file is not one and may run code if unpickled elsewhere"
            ) from None


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


def read_cifar_batch(path: str | Path, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 in ``0..num_classes - 1``.

    Read with :class:`CifarUnpickler` (no code in the file runs). A truncated, corrupt or foreign pickle, a wrong
    shape or dtype, or an out-of-range label raises :class:`~lightning_sgd.data.errors.DataFileError` naming
    ``path``.
    """
    fix = redownload(SOURCE)
    try:
        with open(path, "rb") as f:
            entry = CifarUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as err:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, ValueError, ...)
        raise bad_file(path, f"cannot be unpickled ({type(err).__name__}: {err})", FORMAT, fix) from err
    if not isinstance(entry, dict) or b"data" not in entry:
        keys = sorted(map(repr, entry)) if isinstance(entry, dict) else None
        raise bad_file(path, f"holds a {type(entry).__name__}" + (f" with keys {', '.join(keys)}" if keys else "")
                       + ' and no b"data"', FORMAT, fix)
    data = entry[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad_file(path, f'b"data" is a {described}', FORMAT, fix)
    raw_labels = entry.get(b"labels", entry.get(b"fine_labels"))
    if raw_labels is None:
        raise bad_file(path, 'there is no b"labels" entry', FORMAT, fix)
    try:
        labels = np.asarray(raw_labels)
        if labels.dtype.kind not in "iu" and labels.size:
            raise TypeError(f"dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise bad_file(path, f'b"labels" are not integers ({err})', FORMAT, fix) from err
    if labels.ndim != 1 or len(labels) != len(data):
        raise bad_file(path, f"{len(data)} images but labels of shape {labels.shape}", FORMAT, fix)
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        bad = int(np.argmax(out_of_range))
        raise bad_file(path, f"label {int(labels[bad])} at index {bad} is out of range", f"labels in "
                       f"0..{num_classes - 1}", fix)
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
