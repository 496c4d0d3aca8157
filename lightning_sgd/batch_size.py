"""Pure pieces for changing the batch size inside one fit: a resizable batch sampler and the schedule arithmetic.

:class:`ResizableBatchSampler` wraps any index sampler (a ``RandomSampler``, or the ``DistributedSampler`` that
Lightning injects under DDP, so the data stays sharded) and cuts its indices into batches whose size is read when
each batch is formed. One pass over the sampler is still one epoch: changing the size mid-epoch only changes how
the *remaining* indices are grouped, and ``len()`` reports the batches of the current pass (yielded so far plus
those the remaining indices will make at the current size).

When a new size takes effect: with ``num_workers=0`` the DataLoader forms a batch when it is requested, so a size
set between two batches applies to the very next one. With ``num_workers > 0`` the main process has already drawn
``num_workers * prefetch_factor`` batches of indices ahead; those keep the old size and the new size applies after
them (the lag is exact and ``len()`` accounts for it). A new pass (epoch) always starts at the current size.

The schedule arithmetic (:func:`milestone_multiplier`, :func:`split_global_batch`) is plain Python so it can be
tested without a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

__all__ = ["ResizableBatchSampler", "milestone_multiplier", "split_global_batch"]


class ResizableBatchSampler(Sampler[list[int]]):
    """Batches of indices from ``sampler`` whose size (:attr:`batch_size`) may change between batches.

    Args:
        sampler: the index sampler (must be sized).
        batch_size: examples per batch (>= 1); set the attribute to change it.
        drop_last: drop the last, smaller batch of a pass.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], batch_size: int, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"ResizableBatchSampler: batch_size must be an int >= 1, got {batch_size!r}.")
        try:
            len(sampler)  # type: ignore[arg-type]
        except TypeError as error:
            raise TypeError("ResizableBatchSampler: the sampler must have a length (an epoch is one pass).") from error
        self.sampler = sampler
        self._batch_size = batch_size
        self.drop_last = drop_last
        self._active = False  # a pass is under way
        self._yielded = 0  # batches yielded in the current pass (those a resumed pass skipped included)
        self._consumed = 0  # indices drawn in the current pass (those a resumed pass skipped included)
        self.sizes: list[int] = []  # size of each batch yielded in the current pass, in order (skipped ones excluded)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"ResizableBatchSampler: batch_size must be an int >= 1, got {value!r}.")
        self._batch_size = value

    def _batches(self, num_indices: int) -> int:
        if self.drop_last:
            return num_indices // self._batch_size
        return math.ceil(num_indices / self._batch_size)

    def _skipped(self) -> tuple[int, int]:
        """``(indices, batches)`` the sampler's next pass skips: a mid-epoch resume of a
        :class:`lightning_sgd.resumable.EpochSampler` (else nothing)."""
        pending = getattr(self.sampler, "pending_resume", None)
        skip = pending() if callable(pending) else None
        if not skip:
            return 0, 0
        indices, batches = skip
        return indices, self._batches(indices) if batches is None else batches

    def __len__(self) -> int:
        total = len(self.sampler)  # type: ignore[arg-type]
        if not self._active:
            indices, batches = self._skipped()
            return batches + self._batches(total - indices)
        return self._yielded + self._batches(total - self._consumed)

    def __iter__(self) -> Iterator[list[int]]:
        # State is reset eagerly (not inside the generator) so len() is right between iter() and the first batch.
        self._consumed, self._yielded = self._skipped()
        self._active, self.sizes = True, []
        return self._generate()

    def _generate(self) -> Iterator[list[int]]:
        indices = iter(self.sampler)
        while True:
            size = self._batch_size  # read when this batch is formed
            batch = []
            for index in indices:
                batch.append(index)
                if len(batch) == size:
                    break
            self._consumed += len(batch)
            if not batch or (self.drop_last and len(batch) < size):
                self._active = False
                return
            self._yielded += 1
            self.sizes.append(len(batch))
            yield batch

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)  # type: ignore[union-attr]


def milestone_multiplier(position: int, milestones: Sequence[int], factors: Sequence[float]) -> float:
    """The batch multiplier at ``position`` (step or epoch): the product of the factors of milestones <= position.

    >>> milestone_multiplier(5, [3, 6], [2.0, 4.0])
    2.0
    >>> milestone_multiplier(6, [3, 6], [2.0, 4.0])
    8.0
    """
    multiplier = 1.0
    for milestone, factor in zip(milestones, factors):
        if position >= milestone:
            multiplier *= factor
    return multiplier


def split_global_batch(
    global_batch: int, world_size: int, max_per_device: int | None = None, allow_accumulation: bool = False
) -> tuple[int, int, str]:
    """Per-device batch and accumulation steps for a wanted global batch: ``(per_device, accumulate, note)``.

    ``per_device = ceil(global / world)`` when it fits under ``max_per_device``. Otherwise, with accumulation
    allowed, ``k = ceil(global / (world * max_per_device))`` micro-batches of ``ceil(global / (world k))``; without
    it the per-device batch is capped at ``max_per_device``. ``note`` says which limit bound (``""`` if none).

    >>> split_global_batch(1000, 2, max_per_device=128, allow_accumulation=True)
    (125, 4, 'per-device memory limit 128: accumulating 4 micro-batches')
    """
    if global_batch < 1 or world_size < 1:
        raise ValueError(f"split_global_batch: need global_batch >= 1 and world_size >= 1, got {global_batch}, "
                         f"{world_size}.")
    per_device = math.ceil(global_batch / world_size)
    if max_per_device is None or per_device <= max_per_device:
        return per_device, 1, ""
    if not allow_accumulation:
        return max_per_device, 1, f"per-device memory limit {max_per_device}"
    accumulate = math.ceil(global_batch / (world_size * max_per_device))
    per_device = math.ceil(global_batch / (world_size * accumulate))
    return per_device, accumulate, f"per-device memory limit {max_per_device}: accumulating {accumulate} micro-batches"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
