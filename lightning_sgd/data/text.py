"""Language-modelling corpora in their distribution formats, and the word-level tokenizer the recipes use.

- Penn Treebank (Mikolov's ``simple-examples/data``): ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``,
  one sentence per line, already tokenized and lower-cased, rare words replaced by ``<unk>`` (10k word vocabulary).
- One Billion Word benchmark, LM1B (Chelba et al. 2013): ``1-billion-word-language-modeling-benchmark-r13output/``
  with ``training-monolingual.tokenized.shuffled/news.en-000NN-of-00100`` (99 training shards) and
  ``heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050`` (50 held-out shards), one tokenized
  sentence per line.

Tokenizer (:class:`WordVocab`): split each line on whitespace and append ``<eos>``; map words to ids by a fixed
vocabulary (``<unk>`` for the rest). For PTB the vocabulary is every word of ``ptb.train.txt`` (10,000 words incl.
``<unk>``, + ``<eos>``). For LM1B it is the ``vocab_size`` most frequent words of the first ``vocab_shards``
training shards (ties broken alphabetically), so it is deterministic; Shallue et al. used a 32k sub-word vocabulary
instead, which we do not reproduce (see the README section "Benchmark recipes").

Text files carry no header or length, so the checks are what they can be: a file that is empty, compressed (still
``.gz``/``.tgz``/...), holds a NUL byte (binary data) or does not end with a newline (cut short) is refused, naming
it; an odd invalid UTF-8 byte is replaced (U+FFFD), as before. The LM1B caches (vocabulary ``.txt``, token ids
``.npy``) are checked in full: header, dtype, shape and every id below the vocabulary size.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lightning_sgd.data.errors import bad_file, delete_cache, redownload

EOS, UNK = "<eos>", "<unk>"
PTB_FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}
PTB_SOURCE = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz (files under simple-examples/data/)"
LM1B_FOLDER = "1-billion-word-language-modeling-benchmark-r13output"
LM1B_TRAIN = "training-monolingual.tokenized.shuffled"
LM1B_HELDOUT = "heldout-monolingual.tokenized.shuffled"
LM1B_SOURCE = "https://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
TEXT_FORMAT = "plain UTF-8 text, one tokenized sentence per line, ending with a newline"
VOCAB_FORMAT = f"a vocabulary written by WordVocab.save: one word per line, {UNK} then {EOS} first, no duplicates"
IDS_FORMAT = "a .npy file of one 1-D array of token ids (uint16 up to 65,536 words, else int32) below the vocab size"
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


def tokenize_line(line: str) -> list[str]:
    """Whitespace tokens of one sentence followed by ``<eos>``; an empty line gives no tokens."""
    words = line.split()
    return [*words, EOS] if words else []


class WordVocab:
    """A fixed word → id map; id 0 is ``<unk>``, id 1 is ``<eos>``."""

    def __init__(self, words: Iterable[str]) -> None:
        self.itos: list[str] = [UNK, EOS]
        for word in words:
            if word not in (UNK, EOS):
                self.itos.append(word)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("WordVocab: duplicate words.")

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def from_counts(cls, counts: collections.Counter, max_size: int | None = None) -> WordVocab:
        """The ``max_size`` most frequent words (incl. ``<unk>``/``<eos>``), ties broken alphabetically."""
        ranked = sorted((w for w in counts if w not in (UNK, EOS)), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - 2)]
        return cls(ranked)

    def encode(self, lines: Iterable[str]) -> np.ndarray:
        """Token ids (int32) of the concatenated lines, each followed by ``<eos>``."""
        stoi, unk = self.stoi, self.stoi[UNK]
        ids = [stoi.get(tok, unk) for line in lines for tok in tokenize_line(line)]
        return np.asarray(ids, dtype=np.int32)

    def save(self, path: Path) -> None:
        """One word per line, ids in order; written to a temporary name and renamed, so never left half-written."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(self.itos) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        """A vocabulary written by :meth:`save` (a cache file: a damaged one is refused, naming the file to delete)."""
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise bad_file(path, f"is not UTF-8 text ({err.reason} at byte {err.start})", VOCAB_FORMAT,
                           delete_cache(path)) from err
        words = text.split("\n")
        if words[:2] != [UNK, EOS] or words[-1] != "":
            problem = "is cut short (no final newline)" if words[-1] else f"starts with {words[:2]}"
            raise bad_file(path, problem, VOCAB_FORMAT, delete_cache(path))
        try:
            return cls(w for w in words[2:] if w)
        except ValueError as err:
            raise bad_file(path, "lists a word twice", VOCAB_FORMAT, delete_cache(path)) from err


def _lines(path: Path, source: str) -> Iterator[str]:
    """The lines of a corpus file, refusing (by name) one that is empty, compressed, binary or cut short."""
    with open(path, "rb") as f:
        head = f.read(8)
        if not head:
            raise bad_file(path, "is empty", TEXT_FORMAT, redownload(source))
        kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
        if kind is not None:
            raise bad_file(path, f"is {kind}-compressed", TEXT_FORMAT, f"Unpack it (the files come from {source}).")
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            raise bad_file(path, "does not end with a newline as the distributed files do, so it was probably cut "
                           "short", TEXT_FORMAT, redownload(source) + " (A copy you edited yourself: end it with a "
                           "newline.)")
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if "\x00" in line:
                raise bad_file(path, f"line {number} holds a NUL byte (binary data, not text)", TEXT_FORMAT,
                               redownload(source))
            yield line


# ------------------------------------------------------------------------------------------------------------ PTB
def load_ptb(root: str | Path) -> tuple[dict[str, np.ndarray], WordVocab]:
    """Token ids of the three PTB splits (vocabulary from the training file) and the vocabulary."""
    root = Path(root)
    for candidate in (root, root / "simple-examples" / "data"):
        if all((candidate / f).exists() for f in PTB_FILES.values()):
            root = candidate
            break
    else:
        raise FileNotFoundError(
            f"Penn Treebank: expected {', '.join(PTB_FILES.values())} under {root}. Download {PTB_SOURCE} and pass "
            "--data.init_args.root=<the folder holding the three files>."
        )
    counts = collections.Counter(
        tok for line in _lines(root / PTB_FILES["train"], PTB_SOURCE) for tok in tokenize_line(line))
    vocab = WordVocab.from_counts(counts)
    return {split: vocab.encode(_lines(root / name, PTB_SOURCE)) for split, name in PTB_FILES.items()}, vocab


# ----------------------------------------------------------------------------------------------------------- LM1B
def lm1b_shards(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Sorted training and held-out shard paths under ``root`` (or ``root/<LM1B_FOLDER>``)."""
    root = Path(root)
    for candidate in (root, root / LM1B_FOLDER):
        train = sorted((candidate / LM1B_TRAIN).glob("news.en-*-of-*"))
        heldout = sorted((candidate / LM1B_HELDOUT).glob("news.en.heldout-*-of-*"))
        if train and heldout:
            return train, heldout
    raise FileNotFoundError(
        f"LM1B: expected {LM1B_TRAIN}/news.en-000NN-of-00100 and {LM1B_HELDOUT}/news.en.heldout-000NN-of-00050 "
        f"under {root} or {root / LM1B_FOLDER}. Download {LM1B_SOURCE}, unpack it and pass "
        "--data.init_args.root=<the unpacked folder>."
    )


def lm1b_vocab(train_shards: list[Path], vocab_size: int, vocab_shards: int, cache_dir: Path | None) -> WordVocab:
    """The LM1B word vocabulary (see the module docstring), cached as a text file in ``cache_dir``."""
    shards = train_shards[: max(1, vocab_shards)]
    key = hashlib.sha1(f"{vocab_size}-{[p.name for p in shards]}".encode()).hexdigest()[:12]
    path = cache_dir / f"vocab-{vocab_size}-{key}.txt" if cache_dir is not None else None
    if path is not None and path.exists():
        vocab = WordVocab.load(path)
        if len(vocab) > vocab_size:
            raise bad_file(path, f"holds {len(vocab)} words", f"{VOCAB_FORMAT}, at most vocab_size={vocab_size} words",
                           delete_cache(path))
        return vocab
    counts: collections.Counter = collections.Counter()
    for shard in shards:
        for line in _lines(shard, LM1B_SOURCE):
            counts.update(tokenize_line(line))
    vocab = WordVocab.from_counts(counts, vocab_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        vocab.save(path)
    return vocab


def encode_shards(shards: list[Path], vocab: WordVocab, cache_dir: Path | None) -> np.ndarray:
    """Token ids of the concatenated shards; each shard's ids are cached as ``.npy`` (memory-mapped on reload)."""
    dtype = np.uint16 if len(vocab) <= 2**16 else np.int32
    parts = []
    vocab_key = hashlib.sha1("\n".join(vocab.itos).encode()).hexdigest()[:12]
    for shard in shards:
        path = cache_dir / f"{shard.name}-{vocab_key}.npy" if cache_dir is not None else None
        if path is not None and path.exists():
            parts.append(_load_ids(path, dtype, len(vocab)))
            continue
        ids = vocab.encode(_lines(shard, LM1B_SOURCE)).astype(dtype)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")  # unique per process, renamed when complete
            np.save(tmp, ids)
            tmp.replace(path)
        parts.append(ids)
    return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])


def _load_ids(path: Path, dtype: type, vocab_size: int) -> np.ndarray:
    """A cached ``.npy`` of token ids, memory-mapped, refused by name when damaged or holding an id >= vocab_size."""
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise bad_file(path, f"cannot be read ({type(err).__name__}: {err})", IDS_FORMAT, delete_cache(path)) from err
    if ids.dtype != np.dtype(dtype) or ids.ndim != 1:
        raise bad_file(path, f"holds {ids.dtype} of shape {ids.shape}, not 1-D {np.dtype(dtype)}", IDS_FORMAT,
                       delete_cache(path))
    if len(ids) and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(np.argmax((ids >= vocab_size) | (ids < 0)))
        raise bad_file(path, f"token id {int(ids[bad])} at index {bad} is out of range for {vocab_size} words",
                       IDS_FORMAT, delete_cache(path))
    return ids
