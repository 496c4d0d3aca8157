"""Damaged data files are refused at load with an error that names the file, the format expected and the fix.

Each reader (IDX for MNIST/Fashion-MNIST, CIFAR-10 pickles, the MNIST-1D cache, PTB/LM1B text and the LM1B caches,
ImageNet folders) is fed a truncated file, corrupt bytes, a wrong header or shape, and out-of-range labels. A CIFAR
pickle that carries code is refused before the code runs.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sgd.data import synthetic
from lightning_sgd.data.cifar import CifarUnpickler, load_cifar10, read_cifar_batch, write_cifar_batch
from lightning_sgd.data.errors import DataFileError
from lightning_sgd.data.idx import IDX_FILES, load_idx_split, read_idx, write_idx
from lightning_sgd.data.imagenet import ImageFolderDataset, list_image_folder
from lightning_sgd.data.mnist1d import read_mnist1d_cache
from lightning_sgd.data.text import WordVocab, encode_shards, lm1b_shards, lm1b_vocab, load_ptb

REDOWNLOAD = "download it again"
DELETE = "delete"


def refused(path: Path, *fragments: str):
    """``pytest.raises(DataFileError)`` whose message names ``path`` and contains every fragment."""
    pattern = "".join(f"(?=[\\s\\S]*{re.escape(str(f))})" for f in (path, *fragments))
    return pytest.raises(DataFileError, match=pattern)


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def flip_middle(path: Path, count: int = 64) -> None:
    """Overwrite ``count`` bytes in the middle of the file with random ones (keeps the header and the length)."""
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2
    raw[start : start + count] = np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)
@pytest.fixture(params=["mnist", "fashion_mnist"])
def idx_root(request, tmp_path):
    return request.param, synthetic.write_mnist(tmp_path / request.param, num_train=16, num_test=8)


@pytest.mark.parametrize("damage", ["truncated_gzip", "corrupt_gzip", "truncated_body", "truncated_header",
                                    "wrong_magic", "empty"])
def test_idx_damaged_file_names_path_format_and_source(idx_root, damage):
    dataset, root = idx_root
    path = root / IDX_FILES["train"][0]
    source = {"mnist": "ossci-datasets", "fashion_mnist": "zalandoresearch"}[dataset]
    if damage == "truncated_gzip":
        truncate(path)
    elif damage == "corrupt_gzip":
        flip_middle(path)
    elif damage == "truncated_body":  # uncompressed under the .gz name, its last image cut short
        path.write_bytes(gzip.decompress(path.read_bytes())[:-100])
    elif damage == "truncated_header":
        path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 16))
    elif damage == "wrong_magic":
        path.write_bytes(b"\x50\x4b\x03\x04" + bytes(100))
    else:
        path.write_bytes(b"")
    with refused(path, "IDX file", REDOWNLOAD, source):
        load_idx_split(root, "train", dataset)


def test_idx_uncompressed_file_under_gz_name_still_loads(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "plain.gz.raw", images)  # no .gz suffix: written uncompressed
    (tmp_path / "plain.gz.raw").rename(tmp_path / "plain.gz")
    assert np.array_equal(read_idx(tmp_path / "plain.gz"), images)


def test_idx_out_of_range_label_names_the_labels_file(idx_root):
    dataset, root = idx_root
    path = root / IDX_FILES["train"][1]
    labels = read_idx(path)
    labels[5] = 57
    write_idx(path, labels)
    with refused(path, "label 57 at index 5", "0..9", REDOWNLOAD):
        load_idx_split(root, "train", dataset)


@pytest.mark.parametrize("which, array", [
    ("images", np.zeros((16, 32, 32), np.uint8)),  # wrong image size
    ("images", np.zeros((16, 28, 28), np.float32)),  # wrong dtype
    ("labels", np.zeros((16, 1), np.uint8)),  # labels with an extra dimension
    ("labels", np.zeros(15, np.uint8)),  # one label short
])
def test_idx_wrong_shape_or_dtype_names_the_file(tmp_path, which, array):
    root = synthetic.write_mnist(tmp_path, num_train=16, num_test=8)
    path = root / IDX_FILES["train"][0 if which == "images" else 1]
    write_idx(path, array)
    with refused(path, REDOWNLOAD):
        load_idx_split(root, "train")


# ------------------------------------------------------------------------------------------------------ CIFAR-10
@pytest.fixture
def cifar_batch(tmp_path):
    synthetic.write_cifar10(tmp_path, per_batch=4)
    return tmp_path / "cifar-10-batches-py" / "data_batch_1"


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "random_bytes", "empty"])
def test_cifar_damaged_pickle_names_path_and_source(cifar_batch, damage):
    if damage == "truncated":
        truncate(cifar_batch)
    elif damage == "corrupt":
        flip_middle(cifar_batch, 2000)
    elif damage == "random_bytes":
        cifar_batch.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:
        cifar_batch.write_bytes(b"")
    with refused(cifar_batch, "CIFAR-10 python batch", "cifar-10-python.tar.gz"):
        load_cifar10(cifar_batch.parent.parent, "train")


@pytest.mark.parametrize("entry, problem", [
    ([1, 2, 3], "holds a list"),
    ({b"labels": [1]}, 'no b"data"'),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "shape (2, 1024)"),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, "float64"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"cat", b"dog"]}, "not integers"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, 'no b"labels"'),
])
def test_cifar_wrong_structure_names_path_and_problem(tmp_path, entry, problem):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with refused(path, problem, "(N, 3072) uint8"):
        read_cifar_batch(path)


def test_cifar_out_of_range_label_names_the_batch(cifar_batch):
    write_cifar_batch(cifar_batch, np.zeros((3, 3, 32, 32), np.uint8), [0, 57, 9])
    with refused(cifar_batch, "label 57 at index 1", "0..9"):
        load_cifar10(cifar_batch.parent, "train")
    write_cifar_batch(cifar_batch, np.zeros((1, 3, 32, 32), np.uint8), [-1])
    with refused(cifar_batch, "label -1"):
        read_cifar_batch(cifar_batch)


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_cifar_pickle_with_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(marker)})
    pickle.loads(payload)  # control: a plain unpickler runs the command
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with refused(path, f"{os.system.__module__}.system", "not one"):
        read_cifar_batch(path)
    assert not marker.exists()
    # other callables are refused by name too, and _codecs.encode only rebuilds latin1 bytes
    path.write_bytes(pickle.dumps({b"data": eval}))
    with refused(path, "refused to load the global builtins.eval"):
        read_cifar_batch(path)
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.")
    with refused(path, "'base64'"):
        read_cifar_batch(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_unpickler_builds_every_protocol_and_numpy_scalar_labels(tmp_path, protocol):
    data = np.random.default_rng(protocol).integers(0, 256, (3, 3072), dtype=np.uint8)
    entry = {b"batch_label": b"b", b"data": data, b"labels": [np.int64(2), 0, 9], b"filenames": [b"a.png"] * 3}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    images, labels = read_cifar_batch(path)
    assert np.array_equal(images.reshape(3, 3072), data) and labels.tolist() == [2, 0, 9]


def test_cifar_unpickler_reads_the_numpy_1_names_of_the_original_files(tmp_path):
    # the distributed batches were pickled by Python 2 with numpy 1.x: protocol 2, numpy.core.multiarray
    data = np.arange(3072, dtype=np.uint8)[None]
    raw = pickle.dumps({b"data": data, b"labels": [3]}, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    path = tmp_path / "test_batch"
    path.write_bytes(raw)
    images, labels = read_cifar_batch(path)
    assert np.array_equal(images.reshape(1, 3072), data) and labels.tolist() == [3]
    with open(path, "rb") as f:
        assert isinstance(CifarUnpickler(f, encoding="bytes").load()[b"data"], np.ndarray)


# --------------------------------------------------------------------------------------------- MNIST-1D cache
@pytest.fixture
def mnist1d_cache(tmp_path):
    from lightning_sgd.recipes.mnist_1d import MNIST1DDataModule

    def build():
        dm = MNIST1DDataModule(num_train=8, num_val=4, num_test=4, batch_size=4, cache_dir=str(tmp_path / "cache"))
        dm.setup()
        return dm

    first = build()
    (path,) = (tmp_path / "cache").glob("train-*.pt")
    return path, first, build


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "garbage", "empty"])
def test_mnist1d_damaged_cache_says_delete_it(mnist1d_cache, damage):
    path, _, build = mnist1d_cache
    if damage == "truncated":
        truncate(path)
    elif damage == "corrupt":
        flip_middle(path, 256)
    elif damage == "garbage":  # torch.load's "invalid load key"
        path.write_bytes(b"not a torch file at all")
    else:  # torch.load's "Ran out of input"
        path.write_bytes(b"")
    with refused(path, "cannot be loaded", "torch.save file", f"{DELETE} {path}"):
        build()


@pytest.mark.parametrize("content, problem", [
    ({"x": 1}, "holds a dict"),
    ((torch.zeros(8, 40), torch.zeros(8, dtype=torch.int64), torch.zeros(1)), "holds a tuple"),
    ((torch.zeros(7, 40), torch.zeros(8, dtype=torch.int64)), "shape (7, 40)"),
    ((torch.zeros(8, 40, dtype=torch.float64), torch.zeros(8, dtype=torch.int64)), "torch.float64"),
    ((torch.zeros(8, 40), torch.zeros(8)), "y is torch.float32"),
    ((torch.full((8, 40), float("nan")), torch.zeros(8, dtype=torch.int64)), "NaN"),
    ((torch.zeros(8, 40), torch.tensor([0, 1, 2, 57, 4, 5, 6, 7])), "label 57 at index 3"),
    ((torch.zeros(8, 40), torch.tensor([0, -1, 2, 3, 4, 5, 6, 7])), "label -1 at index 1"),
])
def test_mnist1d_cache_with_wrong_content_says_delete_it(mnist1d_cache, content, problem):
    path, _, build = mnist1d_cache
    torch.save(content, path)
    with refused(path, problem, f"{DELETE} {path}"):
        build()


def test_mnist1d_cache_with_one_value_changed_fails_its_checksum(mnist1d_cache):
    import zipfile

    path, _, build = mnist1d_cache
    with zipfile.ZipFile(path) as archive:  # the first tensor record holds x: float32 (8, 40)
        record = next(r for r in archive.infolist() if r.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[record.header_offset + 26 : record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length  # the first byte of x's storage
    raw[start : start + 4] = struct.pack("<f", 0.5)  # a plausible, finite value
    path.write_bytes(bytes(raw))
    with refused(path, "CRC", f"{DELETE} {path}"):
        build()


def test_mnist1d_intact_cache_reads_back_what_was_generated(mnist1d_cache):
    path, first, build = mnist1d_cache
    again = build()
    assert torch.equal(again.tensors["train"][0], first.tensors["train"][0])
    x, y = read_mnist1d_cache(path, 8)
    assert x.shape == (8, 40) and y.dtype == torch.int64


# --------------------------------------------------------------------------------------------------- PTB / LM1B
@pytest.mark.parametrize("damage, problem", [
    ("empty", "is empty"),
    ("gzip", "gzip-compressed"),
    ("binary", "NUL byte"),
    ("truncated", "cut short"),
])
def test_ptb_damaged_text_names_the_file(tmp_path, damage, problem):
    synthetic.write_ptb(tmp_path, sentences=20)
    path = tmp_path / "ptb.valid.txt"
    text = path.read_bytes()
    path.write_bytes({"empty": b"", "gzip": gzip.compress(text), "truncated": text[:-7],
                      "binary": text[:50] + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
                      + b"\n"}[damage])
    with refused(path, problem, "UTF-8 text", "simple-examples.tgz"):
        load_ptb(tmp_path)


def test_lm1b_damaged_shard_names_the_file(tmp_path):
    synthetic.write_lm1b(tmp_path, train_shards=1, heldout_shards=1, sentences=20)
    train, _ = lm1b_shards(tmp_path)
    train[0].write_bytes(gzip.compress(train[0].read_bytes()))
    with refused(train[0], "gzip-compressed", "statmt.org"):
        lm1b_vocab(train, vocab_size=50, vocab_shards=1, cache_dir=None)


@pytest.fixture
def lm1b_cache(tmp_path):
    synthetic.write_lm1b(tmp_path / "lm1b", train_shards=1, heldout_shards=1, sentences=30)
    train, _ = lm1b_shards(tmp_path / "lm1b")
    cache = tmp_path / "cache"
    vocab = lm1b_vocab(train, vocab_size=40, vocab_shards=1, cache_dir=cache)
    ids = encode_shards(train, vocab, cache)
    (vocab_path,) = cache.glob("vocab-*.txt")
    (ids_path,) = cache.glob("*.npy")
    return train, vocab, ids, vocab_path, ids_path


@pytest.mark.parametrize("damage, problem", [
    ("truncated", "cut short"),
    ("header", "starts with"),
    ("duplicate", "twice"),
    ("too_many", "holds 42 words"),
    ("not_utf8", "not UTF-8"),
])
def test_lm1b_damaged_vocab_cache_says_delete_it(lm1b_cache, damage, problem):
    train, vocab, _, path, _ = lm1b_cache
    text = path.read_text()
    path.write_bytes({"truncated": text[:-3].encode(), "header": text.split("\n", 1)[1].encode(),
                      "duplicate": (text + vocab.itos[5] + "\n").encode(),
                      "too_many": (text + "extra1\nextra2\n").encode(),
                      "not_utf8": text.encode() + b"\xff\xfe\n"}[damage])
    with refused(path, problem, "WordVocab.save", f"{DELETE} {path}"):
        lm1b_vocab(train, vocab_size=40, vocab_shards=1, cache_dir=path.parent)


@pytest.mark.parametrize("damage, problem", [
    ("truncated", "cannot be read"),
    ("header", "cannot be read"),
    ("wrong_dtype", "int64"),
    ("out_of_range", "token id 57 at index 3"),
])
def test_lm1b_damaged_ids_cache_says_delete_it(lm1b_cache, damage, problem):
    train, vocab, ids, _, path = lm1b_cache
    if damage == "truncated":
        truncate(path, 0.7)
    elif damage == "header":
        path.write_bytes(b"\x93NUMPY garbage" + bytes(200))
    elif damage == "wrong_dtype":
        np.save(path, np.asarray(ids, np.int64))
    else:
        bad = np.array(ids)
        bad[3] = 57
        np.save(path, bad)
    with refused(path, problem, ".npy file", f"{DELETE} {path}"):
        encode_shards(train, vocab, path.parent)


def test_lm1b_intact_caches_read_back(lm1b_cache):
    train, vocab, ids, vocab_path, _ = lm1b_cache
    assert WordVocab.load(vocab_path).itos == vocab.itos
    assert np.array_equal(encode_shards(train, vocab, vocab_path.parent), ids)


# ------------------------------------------------------------------------------------------------------ ImageNet
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not_an_image"])
def test_imagenet_undecodable_image_names_the_file(tmp_path, damage):
    synthetic.write_imagenet(tmp_path, classes=2, per_class=2, size=(64, 48))
    samples, _ = list_image_folder(tmp_path, "train")
    path = samples[1][0]
    if damage == "truncated":
        truncate(path, 0.3)
    elif damage == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    else:
        path.write_text("<html>404 not found</html>")
    dataset = ImageFolderDataset(samples, 16, train=False)
    assert dataset[0][0].shape == (3, 16, 16)
    with refused(path, "cannot be decoded", "image Pillow decodes", "image-net.org"):
        dataset[1]


def test_imagenet_labels_beyond_the_classes_are_refused(tmp_path):
    synthetic.write_imagenet(tmp_path, classes=3, per_class=1)
    _, classes = list_image_folder(tmp_path, "train")
    (tmp_path / "val" / "n99999999").mkdir()  # a validation class the training split lacks: its id would not exist
    with refused(tmp_path / "val", "n99999999", "valprep.sh"):
        list_image_folder(tmp_path, "val", classes)
    with refused(tmp_path / "train", "3 class folders", "labels reach 2", "num_classes=2"):
        list_image_folder(tmp_path, "train", num_classes=2)
    assert len(list_image_folder(tmp_path, "train", num_classes=3)[1]) == 3
