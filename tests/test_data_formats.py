"""The readers decode the standard distribution formats byte for byte, and name the missing files when absent."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from lightning_sgd.data import synthetic
from lightning_sgd.data.cifar import load_cifar10, read_cifar_batch, write_cifar_batch
from lightning_sgd.data.idx import load_idx_split, read_idx, write_idx
from lightning_sgd.data.imagenet import ImageFolderDataset, list_image_folder
from lightning_sgd.data.text import EOS, UNK, WordVocab, encode_shards, lm1b_shards, lm1b_vocab, load_ptb


# --------------------------------------------------------------------------------------------------------- IDX
def test_idx_reads_a_hand_built_file(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), dims 2 x 2 x 3, then 12 bytes row-major: the format as LeCun documents it
    body = bytes(range(12))
    raw = b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 2, 3) + body
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    array = read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert array.shape == (2, 2, 3) and array.dtype == np.uint8
    assert array[1, 0, 2] == 1 * 6 + 0 * 3 + 2
    (tmp_path / "labels").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 0, 9]))
    assert read_idx(tmp_path / "labels").tolist() == [7, 0, 9]
    # big-endian int32 payloads
    (tmp_path / "ints").write_bytes(b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">2i", -5, 70000))
    assert read_idx(tmp_path / "ints").tolist() == [-5, 70000]


def test_idx_round_trip_and_corrupt_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + bytes([1, 2]))
    with pytest.raises(ValueError, match="4 bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_mnist_split_and_missing_files_message(tmp_path):
    synthetic.write_mnist(tmp_path / "m", num_train=10, num_test=4)
    x, y = load_idx_split(tmp_path / "m", "train")
    assert x.shape == (10, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64 and int(y.max()) < 10
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.*fashion-mnist"):
        load_idx_split(tmp_path / "empty", "train", "fashion_mnist")


# ------------------------------------------------------------------------------------------------------ CIFAR
def test_cifar_batch_layout_is_planar_rgb(tmp_path):
    import pickle

    row = np.zeros(3072, dtype=np.uint8)
    row[0], row[1024 + 33], row[2048 + 1023] = 11, 22, 33  # R(0,0), G(1,1), B(31,31)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": row[None], b"labels": [4]}, f)
    images, labels = read_cifar_batch(tmp_path / "data_batch_1")
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [4]
    assert images[0, 0, 0, 0] == 11 and images[0, 1, 1, 1] == 22 and images[0, 2, 31, 31] == 33
    write_cifar_batch(tmp_path / "again", images, labels)
    assert np.array_equal(read_cifar_batch(tmp_path / "again")[0], images)


def test_cifar_loads_all_batches_and_names_missing_files(tmp_path):
    synthetic.write_cifar10(tmp_path, per_batch=3)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and y.shape == (15,)
    assert load_cifar10(tmp_path / "cifar-10-batches-py", "test")[0].shape == (3, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch.*cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path / "nothing", "train")


# ------------------------------------------------------------------------------------------------------- text
def test_ptb_vocab_and_encoding(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" a b <unk> a\n b c \n")
    (tmp_path / "ptb.valid.txt").write_text(" a z\n")
    (tmp_path / "ptb.test.txt").write_text("\n c\n")
    ids, vocab = load_ptb(tmp_path)
    assert vocab.itos == [UNK, EOS, "a", "b", "c"]  # frequency order, ties alphabetical
    assert ids["train"].tolist() == [2, 3, 0, 2, 1, 3, 4, 1]
    assert ids["val"].tolist() == [2, 0, 1]  # unseen word -> <unk>
    assert ids["test"].tolist() == [4, 1]  # empty line: no tokens
    with pytest.raises(FileNotFoundError, match=r"ptb\.valid\.txt.*simple-examples"):
        load_ptb(tmp_path / "missing")


def test_lm1b_vocab_is_deterministic_capped_and_cached(tmp_path):
    synthetic.write_lm1b(tmp_path / "lm1b", train_shards=2, heldout_shards=1, sentences=30)
    train, heldout = lm1b_shards(tmp_path / "lm1b")
    assert [p.name for p in train] == ["news.en-00001-of-00100", "news.en-00002-of-00100"] and len(heldout) == 1
    vocab = lm1b_vocab(train, vocab_size=20, vocab_shards=1, cache_dir=tmp_path / "cache")
    assert len(vocab) == 20 and vocab.itos[:2] == [UNK, EOS]
    assert WordVocab.load(next((tmp_path / "cache").glob("vocab-*.txt"))).itos == vocab.itos
    ids = encode_shards(train, vocab, tmp_path / "cache")
    again = encode_shards(train, vocab, tmp_path / "cache")  # from the .npy cache
    direct = np.concatenate([vocab.encode(p.read_text().splitlines()) for p in train])
    assert np.array_equal(ids, direct) and np.array_equal(again, direct) and ids.dtype == np.uint16
    with pytest.raises(FileNotFoundError, match="heldout-monolingual"):
        lm1b_shards(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------------- ImageNet
def test_imagenet_folder_crops_and_missing_layout(tmp_path):
    synthetic.write_imagenet(tmp_path, classes=3, per_class=2, size=(50, 30))
    samples, classes = list_image_folder(tmp_path, "train")
    assert classes == ["n00000000", "n00000001", "n00000002"] and len(samples) == 6
    assert [label for _, label in samples] == [0, 0, 1, 1, 2, 2]
    for train in (True, False):
        image, label = ImageFolderDataset(samples, 24, train=train)[3]
        assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and int(label) == 1
    with pytest.raises(FileNotFoundError, match=r"train.*<wnid>.*image-net\.org"):
        list_image_folder(tmp_path / "nothing", "train")
