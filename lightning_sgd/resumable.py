"""Data order as a function of ``(seed, epoch)`` and a DataLoader whose place in the epoch goes into the checkpoint.

Together they make a resumed fit see exactly the batches the uninterrupted fit would, from any step:

* :class:`EpochSampler` draws epoch ``e``'s permutation from a generator seeded by ``epoch_seed(seed, e)`` (Lightning
  calls ``set_epoch`` at every epoch start, also after a resume), and shards it over the DDP ranks itself, so
  Lightning keeps it instead of substituting its own ``DistributedSampler``.
* :class:`ResumableDataLoader` counts the batches it has yielded in the current epoch. Lightning saves its
  ``state_dict`` in the checkpoint (``fit_loop.combined_loader``) and hands it back to ``load_state_dict`` before the
  resumed epoch starts; the loader then skips the batches already trained on (the indices only, no data is read).

Per-batch augmentation randomness stays exact by being a pure function of ``(seed, epoch, position)`` too
(:func:`epoch_seed`), instead of the state of a generator shared across the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["EpochPass", "EpochSampler", "ResizableDataLoader", "ResumableDataLoader", "epoch_seed", "trainer_epoch"]

_MASK64 = (1 << 64) - 1


def epoch_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (e.g. an epoch, a rank, a position): different keys give
    independent streams, and unlike ``seed + epoch`` no two ``(seed, epoch)`` pairs share one.

    >>> epoch_seed(0, 1) == epoch_seed(0, 1), epoch_seed(0, 1) == epoch_seed(1, 0)
    (True, False)
    """
    state = np.random.SeedSequence([k & _MASK64 for k in (seed, *keys)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def trainer_epoch(owner: Any) -> Callable[[], int | None]:
    """``current_epoch`` of the trainer that ``owner`` (a DataModule or LightningModule) is attached to, ``None``
    while it has none: the ``current_epoch`` argument of :class:`EpochSampler`."""

    def current_epoch() -> int | None:
        trainer = getattr(owner, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    return current_epoch


class _Length:
    """Stands in for the dataset in ``DistributedSampler``, which only reads its length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass
class EpochPass:
    """One pass of an :class:`EpochSampler`: its epoch, whether it is the training pass of that epoch (the one a
    checkpoint records), the indices it skipped, the indices drawn so far (the skipped ones included) and, for a
    resumed pass, the batches the skipped indices made (``None``: ``start`` divided by the loader's batch size)."""

    epoch: int
    training: bool
    start: int
    position: int
    start_batches: int | None = None


class EpochSampler(DistributedSampler):
    """Indices of a data set of ``num_samples`` examples, shuffled by epoch: epoch ``e`` is
    ``randperm(num_samples)`` under ``epoch_seed(seed, e)``, then this rank's shard (``DistributedSampler``'s padding
    and ``drop_last`` rules).

    It is a ``DistributedSampler``, so under DDP Lightning leaves it in place; ``num_replicas`` and ``rank`` default
    to the process group's (1 and 0 without one).

    Passes: the first pass that starts after ``set_epoch`` is that epoch's *training* pass; passes that tools start
    on the side (a probe set, a BN recalibration) read the same order but never move the training pass. Without
    ``set_epoch`` (a plain ``for`` loop) every pass is a training pass and each one after a finished pass moves to
    the next epoch. :meth:`resume` makes the training pass of a given epoch skip its first indices (a mid-epoch
    resume). :attr:`drawing` is the pass that drew the latest index, which is what a ``collate_fn`` in the same
    process is collating (seeds of the batch augmentation).

    Args:
        num_samples: size of the data set.
        seed: the shuffling seed; the order is a pure function of ``(seed, epoch)``.
        shuffle: ``False`` gives ``0 .. num_samples - 1`` every epoch.
        drop_last: drop the tail that does not divide evenly over the ranks (else pad by repeating indices).
        current_epoch: where a training pass reads its epoch when it begins, e.g. ``lambda: trainer.current_epoch``
            (``None`` from it, or no callable: the last ``set_epoch``). Lightning 2.6 passes ``set_epoch`` its
            count of processed epochs, which runs ahead of ``current_epoch`` after some resumes (a checkpoint saved
            at validation end with ``max_steps``), so the DataModules pass the trainer's epoch here.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None,
                 current_epoch: Callable[[], int | None] | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"EpochSampler: num_samples must be >= 1, got {num_samples}.")
        distributed = dist.is_available() and dist.is_initialized()
        self._follows_process_group = num_replicas is None and rank is None
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(_Length(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.num_samples_total = num_samples
        self.current_epoch = current_epoch
        self.current: EpochPass | None = None  # the latest pass started
        self.drawing: EpochPass | None = None  # the pass that drew the latest index
        self._managed = False  # set_epoch has been called: the caller numbers the epochs
        self._training_pending = True  # the next pass to start is the training pass of self.epoch
        self._training: EpochPass | None = None  # the latest training pass
        self._finished = False  # the latest training pass ran to its end
        # (epoch, indices to skip, batches they made or None) for that epoch's training pass
        self._resume: tuple[int, int, int | None] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._managed, self._training_pending = True, True

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of epoch ``epoch``, in order."""
        n = self.num_samples_total
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            padding = self.total_size - len(indices)
            indices += (indices * (padding // n + 1))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def resume(self, epoch: int, num_indices: int, num_batches: int | None = None) -> None:
        """Make the training pass of epoch ``epoch`` start ``num_indices`` indices in (those a resumed run used);
        ``num_batches``: the batches they made, when the batch size changed during the epoch."""
        if num_indices < 0 or (num_batches is not None and num_batches < 0):
            raise ValueError(f"EpochSampler.resume: num_indices and num_batches must be >= 0, got {num_indices}, "
                             f"{num_batches}.")
        self._resume = (epoch, num_indices, num_batches)

    def pending_resume(self) -> tuple[int, int | None] | None:
        """``(indices, batches)`` the next training pass will skip (see :meth:`resume`), or ``None``."""
        if self._resume is None or not (self._training_pending or not self._managed):
            return None
        epoch = self.current_epoch() if self.current_epoch is not None else None
        epoch = self.epoch if epoch is None else epoch
        return self._resume[1:] if self._resume[0] == epoch else None

    def _begin(self) -> EpochPass:
        if self._follows_process_group and dist.is_available() and dist.is_initialized() and (
                dist.get_world_size() != self.num_replicas):
            raise RuntimeError(
                f"EpochSampler was built for {self.num_replicas} process(es) but the job now has "
                f"{dist.get_world_size()}: build the DataLoader after the process group starts (in the DataModule's "
                "train_dataloader, which Lightning calls then), or pass num_replicas and rank.")
        training = self._training_pending or not self._managed
        if training and self.current_epoch is not None and (epoch := self.current_epoch()) is not None:
            self.epoch, self._finished = epoch, False
        if training and not self._managed and self._finished:  # a plain loop: the next pass is the next epoch
            self.epoch += 1
        start, start_batches = 0, None
        if training:
            if self._resume is not None and self._resume[0] == self.epoch:
                start, start_batches = self._resume[1:]
            self._resume, self._training_pending, self._finished = None, False, False
        run = EpochPass(self.epoch, training, start, start, start_batches)
        if training:
            self._training = run
        self.current = run
        return run

    def __iter__(self) -> Iterator[int]:
        # A generator: the pass begins at the first index, after Lightning's set_epoch, not at iter().
        run = self._begin()
        indices = self.epoch_indices(run.epoch)
        for index in indices[run.start :]:
            run.position += 1
            self.drawing = run
            yield index
        if run is self._training:
            self._finished = True


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose place in the epoch is saved in Lightning checkpoints.

    ``state_dict()`` is ``{"epoch", "batches"}``: the epoch of the sampler's training pass and the batches this
    loader has yielded from it. Lightning stores it with the fit loop and calls ``load_state_dict`` before the
    resumed epoch's first batch; if that epoch is the saved one, its training pass starts after the saved batches,
    so ``batch_idx`` and the data line up with the uninterrupted run. Batches are counted as they leave the loader,
    so worker prefetching does not shift them. Takes the usual ``DataLoader`` arguments with ``sampler`` an
    :class:`EpochSampler` and an integer ``batch_size``; rebuilt around another sampler (Lightning's
    ``overfit_batches`` swaps in a ``SequentialSampler``) it is a plain ``DataLoader`` with an empty state.

    A state that also holds ``"indices"`` (saved by :class:`ResizableDataLoader`, whose batch size changed during
    the epoch) resumes after that many indices instead of ``batches x batch_size``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0  # epoch of the latest training pass
        self._batches = 0  # batches yielded from it (the skipped ones included)
        self._indices = 0  # indices of those batches (the skipped ones included)

    def epoch_sampler(self) -> EpochSampler | None:
        """The :class:`EpochSampler` behind this loader (also when a batch sampler wraps it)."""
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if isinstance(sampler, EpochSampler):
                return sampler
        return None

    def _stateful(self) -> bool:
        return self.epoch_sampler() is not None and self.batch_size is not None

    def _batch_len(self, k: int) -> int:
        """Indices in batch ``k`` (counted from 0) of the current pass; the last one may be shorter (not counted
        exactly: only a finished pass has one, and its state is never resumed into)."""
        assert self.batch_size is not None
        return self.batch_size

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not self._stateful():
            return super().__iter__()
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        # Runs from the first next(), after Lightning's set_epoch (iter() is called before it on a resume).
        sampler = self.epoch_sampler()
        assert sampler is not None
        iterator = super().__iter__()
        run: EpochPass | None = None
        for k, batch in enumerate(iterator):
            if run is None:  # the sampler's pass has begun by the time the first batch is out
                run = sampler.current
                assert run is not None
                if run.training:
                    batches = run.start_batches
                    if batches is None:
                        batches = run.start // self._batch_len(0)
                    self._epoch, self._batches, self._indices = run.epoch, batches, run.start
            if run.training and run is sampler._training:
                self._indices += self._batch_len(k)
                self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self._stateful():
            return {}
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict and not self._stateful():
            return
        if set(state_dict) not in ({"epoch", "batches"}, {"epoch", "batches", "indices"}):
            raise ValueError(f"ResumableDataLoader.load_state_dict: expected the keys 'epoch' and 'batches' (and "
                             f"optionally 'indices'), got {sorted(state_dict)}; the checkpoint was saved with a "
                             "different train DataLoader.")
        sampler = self.epoch_sampler()
        if sampler is None:
            raise ValueError("ResumableDataLoader.load_state_dict: this loader has no EpochSampler to resume; the "
                             "checkpoint was saved with a different train DataLoader.")
        self._epoch, self._batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if "indices" in state_dict:
            self._indices = int(state_dict["indices"])
            sampler.resume(self._epoch, self._indices, self._batches)
        else:
            if self.batch_size is None:
                raise ValueError("ResumableDataLoader.load_state_dict: a state without 'indices' needs a fixed "
                                 "batch_size.")
            self._indices = self._batches * self.batch_size
            sampler.resume(self._epoch, self._indices)


class ResizableDataLoader(ResumableDataLoader):
    """A :class:`ResumableDataLoader` batched by a :class:`lightning_sgd.batch_size.ResizableBatchSampler` (the
    batch size may change between batches, as :class:`lightning_sgd.plugins.BatchSizeSchedule` does): its state
    also counts the indices consumed, ``{"epoch", "batches", "indices"}``, so a mid-epoch resume skips exactly the
    examples already trained on whatever sizes the batches had. Build it with ``batch_sampler=`` a
    ``ResizableBatchSampler`` over an :class:`EpochSampler`."""

    def _stateful(self) -> bool:
        return self.epoch_sampler() is not None and hasattr(self.batch_sampler, "sizes")

    def _batch_len(self, k: int) -> int:
        return self.batch_sampler.sizes[k]  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, int]:
        if not self._stateful():
            return {}
        return {"epoch": self._epoch, "batches": self._batches, "indices": self._indices}
