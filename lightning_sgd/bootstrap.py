"""Pure helpers for the deep bootstrap (Nakkiran, Neyshabur & Sedghi, ICLR 2021).

The deep bootstrap compares a "real world" model trained for T steps on n samples (many epochs) with an "ideal
world" twin trained for the same T steps on fresh i.i.d. samples::

    TestError(f_t) = TestError(f_t^iid) + [TestError(f_t) - TestError(f_t^iid)]      (second term: bootstrap error)

This file holds what :class:`lightning_sgd.callbacks.DeepBootstrap` needs that does not touch a ``Trainer``:

- the **fresh-sample protocol** a DataModule implements (:data:`FRESH_BATCH_METHOD`, :data:`FRESH_POOL_METHOD`),
- :class:`ChunkedStream`, an unlimited deterministic stream generated in fixed-size chunks with per-chunk seeds,
- :class:`PoolSampler` and :func:`split_pool`, the "large held-out pool" option for any map-style dataset,
- :class:`PrivateRNG`, which runs code on its own torch RNG stream and leaves the global RNGs untouched,
- :func:`batch_metrics` / :func:`evaluate`: the loss of any LightningModule (its own ``training_step``), and the
  error and soft error (1 − p_correct) of a classifier that implements the optional protocol,
- :func:`plot_bootstrap`: the two test-error curves (and the real world's train error) as a PNG; the loss curves
  when no error was measured.

The fresh-sample protocol (what a DataModule adds so the twin can train on fresh data), one of:

``fresh_batch(start: int, size: int) -> batch``
    Examples ``start, ..., start + size - 1`` of an unlimited stream of new i.i.d. training examples, collated and
    preprocessed exactly like a training batch (on the CPU). It must be a pure function of ``(start, size)``: the
    same arguments always give the same examples, so the twin is deterministic and resumable from a position.
    Raise ``IndexError`` when the stream is finite and ``start + size`` is past its end.
    :meth:`lightning_sgd.recipes.MNIST1DDataModule.fresh_batch` implements it with a :class:`ChunkedStream`.

``fresh_pool() -> torch.utils.data.Dataset``
    A held-out, map-style set of training examples disjoint from the train/val/test sets (e.g. from
    :func:`split_pool`). The twin consumes it without replacement in a seeded order; it must hold at least
    ``steps × batch_size`` examples. When it runs out the callback warns once, says how many steps it covered, and
    stops the ideal world there (a twin that reuses examples would no longer be the ideal world).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, default_collate

from lightning_sgd._extras import require
from lightning_sgd.batches import batch_size, slice_batch
from lightning_sgd.module_loss import ModuleLoss, module_eval

FRESH_BATCH_METHOD = "fresh_batch"
FRESH_POOL_METHOD = "fresh_pool"

__all__ = [
    "FRESH_BATCH_METHOD",
    "FRESH_POOL_METHOD",
    "ChunkedStream",
    "PoolSampler",
    "PrivateRNG",
    "batch_metrics",
    "evaluate",
    "first_fit_step",
    "plot_bootstrap",
    "split_pool",
]


# ------------------------------------------------------------------------------------------------ fresh samples
class ChunkedStream:
    """An unlimited, deterministic stream of examples produced ``chunk_size`` at a time by ``make_chunk(index)``.

    ``make_chunk(i)`` must return a tuple of tensors whose first dimension is ``chunk_size`` and must depend only on
    ``i`` (give each chunk its own seed). :meth:`take` then gives random access by example position, so a reader is
    resumable from a single integer. The most recently used ``max_cached_chunks`` chunks stay in memory (a
    sequential reader generates each chunk once).

    Generation is synchronous on purpose: generators like MNIST-1D's draw from numpy's *global* RNG, so a
    background thread would race with the training process's own numpy draws. Cache chunks on disk in
    ``make_chunk`` instead when generation is slow.
    """

    def __init__(self, make_chunk: Callable[[int], Sequence[Tensor]], chunk_size: int, max_cached_chunks: int = 2):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        if max_cached_chunks < 1:
            raise ValueError(f"max_cached_chunks must be >= 1, got {max_cached_chunks}.")
        self.make_chunk, self.chunk_size, self.max_cached_chunks = make_chunk, chunk_size, max_cached_chunks
        self._chunks: OrderedDict[int, tuple[Tensor, ...]] = OrderedDict()

    def chunk(self, index: int) -> tuple[Tensor, ...]:
        """Chunk ``index`` (examples ``index·chunk_size`` to ``(index + 1)·chunk_size − 1``)."""
        if index in self._chunks:
            self._chunks.move_to_end(index)
            return self._chunks[index]
        tensors = tuple(self.make_chunk(index))
        for t in tensors:
            if t.shape[0] != self.chunk_size:
                raise ValueError(f"make_chunk({index}) returned {t.shape[0]} examples, expected {self.chunk_size}.")
        self._chunks[index] = tensors
        while len(self._chunks) > self.max_cached_chunks:
            self._chunks.popitem(last=False)
        return tensors

    def take(self, start: int, size: int) -> tuple[Tensor, ...]:
        """Examples ``start .. start + size − 1`` of the stream: a tuple of tensors with first dimension ``size``."""
        if start < 0 or size < 1:
            raise ValueError(f"need start >= 0 and size >= 1, got start={start}, size={size}.")
        first, last = start // self.chunk_size, (start + size - 1) // self.chunk_size
        pieces: list[tuple[Tensor, ...]] = []
        for index in range(first, last + 1):
            lo = max(start - index * self.chunk_size, 0)
            hi = min(start + size - index * self.chunk_size, self.chunk_size)
            pieces.append(tuple(t[lo:hi] for t in self.chunk(index)))
        if len(pieces) == 1:
            return tuple(t.clone() for t in pieces[0])
        return tuple(torch.cat(parts) for parts in zip(*pieces))


class PoolSampler:
    """Fresh batches from a finite held-out pool, consumed without replacement in a seeded random order.

    ``take(start, size)`` returns the collated examples at positions ``start, ..., start + size − 1`` of the
    permuted pool and raises ``IndexError`` past its end, so it satisfies the ``fresh_batch`` protocol.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, collate_fn: Callable[[list[Any]], Any] = default_collate):
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError("fresh_pool() must return a map-style Dataset with __len__ and __getitem__.") from err
        self.dataset, self.collate_fn = dataset, collate_fn
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=generator)

    def __len__(self) -> int:
        return len(self.order)

    def take(self, start: int, size: int) -> Any:
        if start + size > len(self.order):
            raise IndexError(f"the pool holds {len(self.order)} examples; examples {start}..{start + size - 1} asked.")
        return self.collate_fn([self.dataset[int(i)] for i in self.order[start : start + size]])


def split_pool(dataset: Dataset, num_train: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Split ``dataset`` at random into a real-world training set of ``num_train`` examples and a disjoint pool.

    Return the pool from your DataModule's ``fresh_pool()`` and train on the first part: the twin then trains on
    examples the real world never sees, from the same distribution.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not 0 < num_train < n:
        raise ValueError(f"num_train must be in (0, {n}) so both parts are non-empty, got {num_train}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[:num_train]), Subset(dataset, order[num_train:])


# -------------------------------------------------------------------------------------------------- RNG isolation
class PrivateRNG:
    """Run code on a private torch RNG stream: ``with rng: ...`` leaves every global RNG as it found it.

    Inside the block the global torch CPU (and, for a CUDA ``device``, that device's) generator is set to this
    object's own state, which advances across blocks and is saved by :meth:`state_dict`. numpy's and Python's global
    RNGs are restored on exit too (draws from them inside the block are not private, just undone).
    """

    def __init__(self, seed: int = 0, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cpu_state = torch.Generator().manual_seed(seed).get_state()
        self.cuda_state: Tensor | None = None
        if self.device.type == "cuda":
            g = torch.Generator(device=self.device).manual_seed(seed)
            self.cuda_state = g.get_state()
        self._saved: tuple[Any, ...] | None = None

    def __enter__(self) -> PrivateRNG:
        cuda = self.device.type == "cuda"
        self._saved = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state(self.device) if cuda else None,
            np.random.get_state(),
            random.getstate(),
        )
        torch.set_rng_state(self.cpu_state)
        if cuda and self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        torch_state, cuda_state, np_state, py_state = self._saved
        self.cpu_state = torch.get_rng_state()
        if cuda_state is not None:
            self.cuda_state = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(cuda_state, self.device)
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
        self._saved = None

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu_state.clone(), "cuda": None if self.cuda_state is None else self.cuda_state.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cpu_state = state["cpu"].clone()
        if state.get("cuda") is not None and self.device.type == "cuda":
            self.cuda_state = state["cuda"].clone()


# ------------------------------------------------------------------------------------------------------ metrics
def batch_metrics(outputs: Tensor, targets: Tensor) -> dict[str, Tensor] | None:
    """Summed error and soft error of a classification batch; ``None`` when outputs are not ``(B, C)`` logits.

    .. math:: \\text{error} = \\sum_i [\\arg\\max_c z_{ic} \\ne y_i], \\qquad
              \\text{soft error} = \\sum_i (1 - \\operatorname{softmax}(z_i)_{y_i})

    >>> m = batch_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    >>> round(float(m["error"]), 4), round(float(m["soft_error"]), 4)
    (0.0, 0.3881)
    """
    if outputs.ndim != 2 or targets.ndim != 1 or targets.dtype not in (torch.int64, torch.int32):
        return None
    probs = outputs.float().softmax(dim=1)  # (B, C)
    p_correct = probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)  # (B,)
    wrong = outputs.argmax(dim=1) != targets
    return {"error": wrong.sum().float(), "soft_error": (1.0 - p_correct).sum()}


def evaluate(
    module: nn.Module | ModuleLoss,
    batches: Iterable[Any],
    to_device: Callable[[Any], Any] = lambda batch: batch,
    max_examples: int | None = None,
    allow_empty: bool = False,
) -> dict[str, float]:
    """Mean ``loss`` (and ``error``, ``soft_error`` for classifiers) of a module over ``batches``.

    The loss of a batch is the module's own training loss (:class:`~lightning_sgd.module_loss.ModuleLoss`: its
    ``training_step``, or ``loss(forward(inputs), targets)`` when it implements the optional protocol), a mean over
    the batch, so each batch's loss is weighted by its size. ``error`` and ``soft_error`` need the network's outputs
    and the targets, so they are computed only through the protocol, and only for ``(B, C)`` logits with integer
    labels (:func:`batch_metrics`). Runs inside :meth:`ModuleLoss.isolated` (the module's logging muted, its RNG
    draws and buffers undone) in eval mode under ``no_grad``. ``max_examples`` stops after that many examples (the
    last batch is cut to fit). Pass a ``ModuleLoss`` to reuse one (and name the caller in its errors). No batches
    at all is a ``ValueError``, or ``{}`` with ``allow_empty``.
    """
    loss_fn = module if isinstance(module, ModuleLoss) else ModuleLoss(module, "evaluate")
    net = loss_fn.module
    totals: dict[str, float] = {}
    count = 0
    with loss_fn.isolated(), module_eval(net), torch.no_grad():
        for batch in batches:
            batch = to_device(batch)
            n = batch_size(batch, loss_fn.who)
            if max_examples is not None and count + n > max_examples:
                keep = max_examples - count
                if keep <= 0:
                    break
                batch, n = slice_batch(batch, slice(0, keep), loss_fn.who), keep
            if loss_fn.uses_protocol:
                outputs, targets = loss_fn.outputs(batch)
                sums = {"loss": net.loss(outputs, targets).float() * n}  # type: ignore[operator]
                sums.update(batch_metrics(outputs, targets) or {})
            else:
                sums = {"loss": loss_fn.loss(batch).float() * n}
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += n
            if max_examples is not None and count >= max_examples:
                break
    if count == 0:
        if allow_empty:
            return {}
        raise ValueError("evaluate() got no examples: the evaluation set is empty.")
    return {key: value / count for key, value in totals.items()}


# --------------------------------------------------------------------------------------------------------- plot
def first_fit_step(history: Sequence[Mapping[str, float]], threshold: float = 0.01) -> float | None:
    """The first measured step at which ``bootstrap/real_train_error`` is at most ``threshold`` (None: never)."""
    return next((h["step"] for h in history if h.get("bootstrap/real_train_error", 1.0) <= threshold), None)


def plot_bootstrap(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str,
    split: str = "test",
    title: str = "Deep bootstrap",
) -> str:
    """Write a PNG of real vs ideal ``split`` error (and the real world's train error) against steps.

    ``runs`` maps a label (e.g. ``"n=1000"``) to the callback's history: dicts with ``step`` and the
    ``bootstrap/...`` metrics. One colour per run; solid = real world, dashed = ideal world, dotted = real train
    error; a dot marks the first measurement where the real train error is at most 1% (as in the paper's figures).
    When no history holds an error (a module without the protocol, or not a classifier) the losses are drawn instead.
    Uses matplotlib's object API, so it never changes the global backend.
    """
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "the deep-bootstrap plot").FigureCanvasAgg
    Figure = require("matplotlib.figure", "the deep-bootstrap plot").Figure

    histories = list(runs.values())
    metric = "error" if any(f"bootstrap/real_{split}_error" in h for hs in histories for h in hs) else "loss"
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (label, history) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        prefix = f"{label}: " if label else ""
        for key, style, name in (
            (f"bootstrap/real_{split}_{metric}", "-", f"real {split} {metric}"),
            (f"bootstrap/ideal_{split}_{metric}", "--", f"ideal {split} {metric}"),
            (f"bootstrap/real_train_{metric}", ":", f"real train {metric}"),
        ):
            points = [(max(h["step"], 0.5), h[key]) for h in history if key in h]  # step 0 shown at 0.5 (log axis)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, label=prefix + name)
        fitted = first_fit_step(history)  # the paper's dots: where the real world's train error reaches 1%
        real_key = f"bootstrap/real_{split}_error"
        at = [h for h in history if h["step"] == fitted and real_key in h]
        if at and metric == "error":
            ax.plot([max(fitted, 0.5)], [at[0][real_key]], "o", color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps (step 0 drawn at 0.5)")
    if metric == "error":
        ax.set_ylabel("classification error")
        ax.set_ylim(bottom=0)
    else:
        ax.set_ylabel("loss (training_step)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
