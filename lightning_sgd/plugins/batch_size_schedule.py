"""Change the batch size inside one ``fit``: a milestone schedule and a noise-scale-driven controller.

Smith, Kindermans, Ying, Le (2018), "Don't decay the learning rate, increase the batch size": where a step
schedule would divide the LR by ``k``, multiply the batch by ``k`` instead (:class:`BatchSizeSchedule`).
McCandlish et al. (2018): the gradient noise scale B_simple says how large a batch still buys an almost linear cut
in steps; :class:`AdaptiveBatchSize` grows the batch towards the current estimate of
:class:`lightning_sgd.callbacks.GradientNoiseScale`.

Mechanism (shared by both callbacks). At train start the processed train DataLoader (after Lightning injected a
``DistributedSampler`` under DDP) is rebuilt around the *same* index sampler with a
:class:`lightning_sgd.batch_size.ResizableBatchSampler`, so sharding, shuffling RNG and data order are unchanged and
any DataModule whose train loader is a standard map-style ``DataLoader`` works. A change of the per-device batch
applies to the next batch drawn (``num_workers=0``; with workers after the ``num_workers * prefetch_factor`` batches
already drawn, or at the next epoch). An epoch stays one pass over the data: the loop's batch count, the fetcher's
"last batch" test and a fractional ``val_check_interval`` follow the change. Decisions are taken only at optimizer
step or epoch boundaries, computed on rank 0 and broadcast, so every rank uses the same batch.

Learning rate: with global batch ``B = per-device x world x accumulation`` and the batch at train start ``B_0``
the learning rates carry the factor ``s(B) / s(B_0)`` with ``s`` linear (``B``), ``sqrt`` (``sqrt B``) or
``none`` (1). On a change every param group's ``lr`` (and ``initial_lr``, ``max_lr``, ``min_lr``) and each
scheduler's ``base_lrs`` (CyclicLR ``max_lrs``) are multiplied by ``s(B_new) / s(B_old)``, so a user's scheduler
keeps running on top of the factor, and :class:`lightning_sgd.plugins.LRWarmupScaling`'s un-warmed LRs are
rescaled too. Optimizer and scheduler states in a checkpoint hold the scaled values; this callback's state holds the
batch size, accumulation, factor and decision history, so a resumed fit continues exactly.

EMA: :class:`lightning_sgd.plugins.EMAWeights` with ``half_life_samples`` counts the examples of the actual batches,
so its memory in examples is unchanged by a batch change.

Both callbacks work with any LightningModule (they touch the DataLoader, the optimizers and the schedulers, never
the module) under ``pytorch_lightning.Trainer`` or ``lightning.Trainer``. :class:`AdaptiveBatchSize` only reads
``b_simple``, ``grad_sq_norm`` and ``measured`` from a noise-scale estimator.

Limits (checked when training starts): one map-style train DataLoader with automatic batching;
``limit_train_batches`` must be 1.0; an integer ``val_check_interval`` stays counted in batches; schedulers or
warmups sized from ``trainer.estimated_stepping_batches`` (OneCycleLR, ``warmup_epochs``) see the steps of the
initial batch size. Accumulation changes (AdaptiveBatchSize with ``accumulate=True``) take effect at the next epoch
start, as with Lightning's ``GradientAccumulationScheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader
from typing_extensions import override

from lightning_sgd.batch_size import ResizableBatchSampler, milestone_multiplier, split_global_batch
from lightning_sgd.checks import check_bool, check_float, check_int
from lightning_sgd.compat import (
    Callback,
    replace_train_dataloader,
    restart_train_fetcher,
    train_dataloaders,
    train_fetcher,
)
from lightning_sgd.core import log_metrics
from lightning_sgd.plugins.lr_warmup_scaling import RULES, LRWarmupScaling, rescale_learning_rates, scale_factor
from lightning_sgd.resumable import EpochSampler, ResizableDataLoader

__all__ = ["AdaptiveBatchSize", "BatchSizeSchedule"]

_INTERVALS = ("step", "epoch")


def _rebuild_loader(loader: DataLoader, batch_size: int | None) -> tuple[DataLoader, ResizableBatchSampler]:
    """The same DataLoader around the same index sampler, batched by a :class:`ResizableBatchSampler`."""
    old = loader.batch_sampler
    if isinstance(old, ResizableBatchSampler):
        return loader, old
    if old is None or not hasattr(old, "sampler") or not isinstance(getattr(old, "batch_size", None), int):
        raise TypeError("batch-size control needs a map-style train DataLoader with automatic batching "
                        f"(batch_size=...); got batch_sampler={type(old).__name__}.")
    if type(old) is not BatchSampler:
        raise TypeError(f"batch-size control replaces the train DataLoader's BatchSampler; a custom "
                        f"{type(old).__name__} cannot be resized.")
    sampler = ResizableBatchSampler(old.sampler, batch_size or old.batch_size, drop_last=old.drop_last)
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        multiprocessing_context=loader.multiprocessing_context, persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device, in_order=getattr(loader, "in_order", True),
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    # Over an EpochSampler the rebuilt loader keeps its place in the epoch in checkpoints (indices consumed, whatever
    # sizes the batches had), so a mid-epoch resume is exact; over any other sampler it is a plain DataLoader.
    cls = ResizableDataLoader if isinstance(old.sampler, EpochSampler) else DataLoader
    return cls(loader.dataset, batch_sampler=sampler, **kwargs), sampler


class _BatchSizeController(Callback):
    """Shared mechanism: owns the resizable sampler, applies changes, rescales the LR, logs and checkpoints."""

    _name = "batch size"

    def __init__(self, lr_rule: str) -> None:
        if lr_rule not in RULES:
            raise ValueError(f"{type(self).__name__}: lr_rule must be one of {RULES}, got {lr_rule!r}.")
        self.lr_rule = lr_rule
        # Resumable state (state_dict); None until training starts.
        self.base_batch_size: int | None = None  # per-device batch of the train DataLoader at the start of the run
        self.batch_size: int | None = None  # current per-device batch
        self.accumulate: int | None = None  # current accumulate_grad_batches
        self.pending_accumulate: int | None = None  # applied at the next epoch start
        self.initial_global_batch_size: int | None = None
        self.lr_factor = 1.0  # s(B) / s(B_0) currently applied to the learning rates
        self.history: list[dict[str, Any]] = []  # one entry per decision that changed something (and the start)
        # Per-run state.
        self._sampler: ResizableBatchSampler | None = None
        self._last_step = -1

    # --------------------------------------------------------------------------------------------- public values
    def global_batch_size(self, trainer: pl.Trainer) -> int:
        assert self.batch_size is not None and self.accumulate is not None
        return self.batch_size * trainer.world_size * self.accumulate

    # ------------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.limit_train_batches != 1.0:
            raise ValueError(f"{type(self).__name__}: limit_train_batches must be 1.0 (an epoch is one pass over the "
                             f"data at a changing batch size), got {trainer.limit_train_batches}.")
        # A new fit starts from the DataLoader's batch; a checkpoint (restored after setup) brings its own state.
        self.base_batch_size = self.batch_size = self.accumulate = self.pending_accumulate = None
        self.initial_global_batch_size, self.lr_factor, self.history = None, 1.0, []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)
        assert self._sampler is not None
        if self.batch_size is None:  # fresh run
            self.base_batch_size = self.batch_size = self._sampler.batch_size
            self.accumulate = trainer.accumulate_grad_batches
            self.initial_global_batch_size = self.global_batch_size(trainer)
            self._record(trainer, "start", f"train DataLoader batch {self.batch_size} per device")
        else:  # resumed: the optimizer and scheduler states already carry lr_factor
            trainer.accumulate_grad_batches = self.accumulate
        self._sampler.batch_size = self.batch_size
        self._last_step = trainer.global_step
        proposal = self._propose(trainer, pl_module, boundary="start")
        if proposal is not None:
            self._apply(trainer, *proposal, epoch_start=True)
        self._restart_iterator(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loader(trainer).batch_sampler is not self._sampler:  # reload_dataloaders_every_n_epochs
            self._install(trainer)
            assert self._sampler is not None
            self._sampler.batch_size = self.batch_size  # type: ignore[assignment]
        if self.pending_accumulate is not None:
            assert self.batch_size is not None
            self._apply(trainer, self.batch_size, self.pending_accumulate, "accumulation change deferred to the "
                        "epoch start", epoch_start=True)
        proposal = self._propose(trainer, pl_module, boundary="epoch")
        if proposal is not None:
            self._apply(trainer, *proposal, epoch_start=True)
        self._set_epoch_lengths(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # still accumulating: the batch only changes at optimizer-step boundaries
        self._last_step = trainer.global_step
        proposal = self._propose(trainer, pl_module, boundary="step")
        if proposal is not None:
            self._apply(trainer, *proposal, epoch_start=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_batch_size": self.base_batch_size, "batch_size": self.batch_size, "accumulate": self.accumulate,
                "pending_accumulate": self.pending_accumulate, "initial_global_batch_size":
                self.initial_global_batch_size, "lr_factor": self.lr_factor, "history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("base_batch_size", "batch_size", "accumulate", "pending_accumulate", "initial_global_batch_size",
                    "lr_factor"):
            setattr(self, key, state_dict[key])
        self.history = [dict(h) for h in state_dict["history"]]

    # -------------------------------------------------------------------------------------- what subclasses decide
    def _propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: str
                 ) -> tuple[int, int, str] | None:
        """``(per_device, accumulate, reason)`` to switch to, or ``None``; called on every rank at the same points."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------- mechanism
    @staticmethod
    def _loader(trainer: pl.Trainer) -> DataLoader:
        loaders = train_dataloaders(trainer)
        if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
            raise TypeError("batch-size control supports exactly one train DataLoader.")
        return loaders[0]

    def _install(self, trainer: pl.Trainer) -> None:
        loader, self._sampler = _rebuild_loader(self._loader(trainer), self.batch_size)
        replace_train_dataloader(trainer, loader)

    def _restart_iterator(self, trainer: pl.Trainer) -> None:
        """``FitLoop.setup_data`` made the first epoch's iterator from the original loader: make it again."""
        restart_train_fetcher(trainer)
        self._set_epoch_lengths(trainer)

    def _set_epoch_lengths(self, trainer: pl.Trainer) -> None:
        """Batches of a full pass at the current size (the fetcher counts its own when the pass starts)."""
        assert self._sampler is not None
        was_active, self._sampler._active = self._sampler._active, False
        trainer.fit_loop.max_batches = len(self._sampler)
        self._sampler._active = was_active
        self._sync_val_check(trainer)

    def _shift_lengths(self, trainer: pl.Trainer, delta: int) -> None:
        """A mid-epoch change: the remaining indices make ``delta`` more (or fewer) batches in this pass."""
        if delta == 0 or not math.isfinite(trainer.fit_loop.max_batches):
            return
        trainer.fit_loop.max_batches += delta
        fetcher = train_fetcher(trainer)
        if fetcher is not None and fetcher.length is not None:
            fetcher.length += delta
        self._sync_val_check(trainer)

    @staticmethod
    def _sync_val_check(trainer: pl.Trainer) -> None:
        interval = trainer.val_check_interval
        if isinstance(interval, float) and isinstance(trainer.val_check_batch, int):
            trainer.val_check_batch = max(1, int(trainer.fit_loop.max_batches * interval))

    def _apply(self, trainer: pl.Trainer, batch_size: int, accumulate: int, reason: str, *, epoch_start: bool) -> None:
        # Rank 0 decides: every rank takes its numbers (they reach this point at the same step/epoch).
        batch_size, accumulate, reason = trainer.strategy.broadcast((batch_size, accumulate, reason), src=0)
        assert self._sampler is not None and self.batch_size is not None and self.accumulate is not None
        examples = len(self._sampler.sampler)  # type: ignore[arg-type]  # this rank's share of one pass
        if self._sampler.drop_last and batch_size > examples:
            rank_zero_warn(f"{type(self).__name__}: per-device batch {batch_size} is larger than this rank's "
                           f"{examples} examples per epoch and the loader drops incomplete batches; using {examples}.")
            batch_size = examples
        if accumulate != self.accumulate and not epoch_start:
            self.pending_accumulate, accumulate = accumulate, self.accumulate
        elif epoch_start:
            self.pending_accumulate = None
        if batch_size == self.batch_size and accumulate == self.accumulate:
            return
        old_global = self.global_batch_size(trainer)
        before = len(self._sampler)
        self.batch_size, self.accumulate = batch_size, accumulate
        self._sampler.batch_size = batch_size
        trainer.accumulate_grad_batches = accumulate
        if not epoch_start:
            self._shift_lengths(trainer, len(self._sampler) - before)
        new_global = self.global_batch_size(trainer)
        assert self.initial_global_batch_size is not None
        factor = scale_factor(self.lr_rule, new_global, self.initial_global_batch_size)
        self._rescale_lr(trainer, factor / self.lr_factor)
        self.lr_factor = factor
        self._record(trainer, reason, f"global batch {old_global} -> {new_global}")

    def _rescale_lr(self, trainer: pl.Trainer, ratio: float) -> None:
        if ratio == 1.0:
            return
        rescale_learning_rates(trainer.optimizers, [config.scheduler for config in trainer.lr_scheduler_configs],
                               ratio)
        for callback in trainer.callbacks:  # LRWarmupScaling's un-warmed LRs follow too
            if isinstance(callback, LRWarmupScaling) and callback.raw_lrs:
                callback.raw_lrs = [[lr * ratio for lr in lrs] for lrs in callback.raw_lrs]

    def _record(self, trainer: pl.Trainer, reason: str, detail: str, extra: dict[str, float] | None = None) -> None:
        assert self.batch_size is not None and self.accumulate is not None
        entry = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_size": self.batch_size,
                 "accumulate": self.accumulate, "global_batch_size": self.global_batch_size(trainer),
                 "lr_factor": self.lr_factor, "reason": reason}
        self.history.append(entry)
        rank_zero_info(f"{type(self).__name__}: step {trainer.global_step} (epoch {trainer.current_epoch}): {detail}; "
                       f"per-device batch {self.batch_size} x {trainer.world_size} device(s) x {self.accumulate} "
                       f"accumulation, LR factor {self.lr_factor:.4g} ({self.lr_rule} rule); reason: {reason}")
        self._log(trainer, {"batch_size/per_device": self.batch_size, "batch_size/accumulate": self.accumulate,
                            "batch_size/global": self.global_batch_size(trainer),
                            "batch_size/lr_factor": self.lr_factor, **(extra or {})})

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        log_metrics(trainer, {k: float(v) for k, v in metrics.items()}, trainer.global_step)


class BatchSizeSchedule(_BatchSizeController):
    """Multiply the batch at milestones, e.g. ×k where a step LR schedule would divide the LR by k (Smith et al.).

    The per-device batch at position ``t`` (optimizer step or epoch, 0-based) is
    ``round(B_0 * prod(factors[i] for milestones[i] <= t))`` with ``B_0`` the train DataLoader's batch size, i.e. the
    mirror image of ``MultiStepLR(milestones, gamma=1/factor)``. A step milestone ``m`` means the batch changes after
    ``m`` optimizer steps (step ``m`` is the first with the new batch); an epoch milestone at the start of that epoch.

    Args:
        milestones: strictly increasing positions (>= 0) where the batch is multiplied.
        factors: one multiplier per milestone, or a single one for all (each > 0; < 1 shrinks).
        interval: ``"epoch"`` or ``"step"`` (optimizer steps).
        lr_rule: how the LR follows the global batch: ``"none"`` (default: the Smith et al. recipe keeps the LR),
            ``"linear"`` or ``"sqrt"``.

    YAML (LightningCLI)::

        trainer:
          callbacks:
            - class_path: lightning_sgd.plugins.BatchSizeSchedule
              init_args: {milestones: [10, 20], factors: 5, interval: epoch}
    """

    def __init__(self, milestones: Sequence[int], factors: float | Sequence[float] = 2.0, interval: str = "epoch",
                 lr_rule: str = "none") -> None:
        super().__init__(lr_rule)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"BatchSizeSchedule: milestones must be a list of ints (steps or epochs), got "
                            f"{milestones!r} ({type(milestones).__name__}); e.g. milestones=[{milestones!r}].")
        milestones = list(milestones)
        if not milestones:
            raise ValueError("BatchSizeSchedule: give at least one milestone.")
        for milestone in milestones:
            check_int("BatchSizeSchedule", "each milestone", milestone, minimum=0)
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"BatchSizeSchedule: milestones must be strictly increasing, got {milestones}.")
        if isinstance(factors, (int, float)) and not isinstance(factors, bool):
            factors = [factors] * len(milestones)
        if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
            raise TypeError(f"BatchSizeSchedule: factors must be a number or a list of numbers, got {factors!r} "
                            f"({type(factors).__name__}).")
        factors = [check_float("BatchSizeSchedule", "each factor", f, low=0.0, low_open=True) for f in factors]
        if len(factors) != len(milestones):
            raise ValueError(f"BatchSizeSchedule: {len(factors)} factors for {len(milestones)} milestones; give one "
                             f"per milestone or a single number.")
        if not all(f > 0 and math.isfinite(f) for f in factors):
            raise ValueError(f"BatchSizeSchedule: factors must be finite and > 0, got {factors}.")
        if interval not in _INTERVALS:
            raise ValueError(f"BatchSizeSchedule: interval must be one of {_INTERVALS}, got {interval!r}.")
        self.milestones, self.factors, self.interval = milestones, factors, interval

    def batch_size_at(self, position: int) -> int:
        """Per-device batch at step/epoch ``position`` (needs the base batch, known once training started)."""
        assert self.base_batch_size is not None
        return max(1, round(self.base_batch_size * milestone_multiplier(position, self.milestones, self.factors)))

    @override
    def _propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: str
                 ) -> tuple[int, int, str] | None:
        if boundary == "start":
            position = trainer.global_step if self.interval == "step" else trainer.current_epoch
        elif boundary != self.interval:
            return None
        else:
            position = trainer.global_step if boundary == "step" else trainer.current_epoch
        wanted = self.batch_size_at(position)
        if wanted == self.batch_size:
            return None
        assert self.accumulate is not None
        return wanted, self.accumulate, f"milestone schedule at {self.interval} {position}"


class AdaptiveBatchSize(_BatchSizeController):
    """Grow the batch towards the gradient noise scale B_simple measured by :class:`GradientNoiseScale`.

    Every ``every_n_steps`` optimizer steps (from ``start_step``) rank 0 reads the GNS callback's smoothed
    ``b_simple`` and sets the target global batch ``T = min(max_batch_size, target_ratio * B_simple)``. The batch
    grows only if ``T >= (1 + hysteresis) * B`` (B the current global batch): noise in the estimate does not make it
    jitter, and it never shrinks (growth replaces LR decay; a shrinking batch would undo it). One decision grows it
    to ``min(T, max_growth * B)``, so a wild estimate moves it by at most ``max_growth`` per decision. The new
    per-device batch is ``ceil(T / world)`` rounded down to a multiple of ``multiple_of``; above
    ``max_per_device_batch_size`` it is capped there, or, with ``accumulate=True``, split into
    ``k = ceil(T / (world * max_per_device))`` accumulated micro-batches (the accumulation change applies at the
    next epoch start). Every decision, changed or not, is logged (``batch_size/b_simple``, ``batch_size/target``,
    ``batch_size/grew``, ``batch_size/gns_measurements`` and the sizes) with a log line giving its reason; changes
    are kept in :attr:`history`.

    No decision is taken on an estimate that cannot be trusted yet (the batch is kept and the reason logged): fewer
    than ``min_measurements`` GNS measurements, a smoothed |G|² (``grad_sq_norm``) that is not finite and positive
    (B_simple is then ``inf``: noise drowns the gradient, which says nothing about a useful batch size), or a
    B_simple that is not finite and positive.

    Args:
        max_batch_size: largest global batch (all devices and micro-batches).
        every_n_steps: decision interval in optimizer steps.
        start_step: first decision step (default ``every_n_steps``: let the GNS estimate settle).
        target_ratio: ``T = target_ratio * B_simple`` (1: McCandlish's B_simple ~ B_crit).
        hysteresis: relative growth needed before the batch changes (>= 0).
        max_per_device_batch_size: memory limit per device (``None``: none).
        accumulate: exceed the per-device limit by gradient accumulation.
        multiple_of: per-device batch granularity (e.g. 8 for tensor cores).
        lr_rule: ``"linear"`` (default), ``"sqrt"`` or ``"none"``.
        noise_scale: the estimator to read: an object with ``b_simple``, ``grad_sq_norm`` (the smoothed |G|²) and
            ``measured`` (how many measurements the estimate holds), like :class:`GradientNoiseScale`; ``None``
            finds the GradientNoiseScale callback in ``trainer.callbacks``.
        min_measurements: GNS measurements the estimate must hold before any decision (>= 1).
        max_growth: largest factor by which one decision may grow the global batch (> 1; ``math.inf``: no cap).
    """

    def __init__(self, max_batch_size: int, every_n_steps: int = 50, start_step: int | None = None,
                 target_ratio: float = 1.0, hysteresis: float = 0.25, max_per_device_batch_size: int | None = None,
                 accumulate: bool = False, multiple_of: int = 1, lr_rule: str = "linear", noise_scale: Any = None,
                 min_measurements: int = 10, max_growth: float = 2.0) -> None:
        super().__init__(lr_rule)
        check_int("AdaptiveBatchSize", "max_batch_size", max_batch_size, minimum=1)
        check_int("AdaptiveBatchSize", "every_n_steps", every_n_steps, minimum=1)
        if start_step is not None:
            check_int("AdaptiveBatchSize", "start_step", start_step, minimum=0)
        if max_per_device_batch_size is not None:
            check_int("AdaptiveBatchSize", "max_per_device_batch_size", max_per_device_batch_size, minimum=1)
        check_int("AdaptiveBatchSize", "multiple_of", multiple_of, minimum=1)
        check_int("AdaptiveBatchSize", "min_measurements", min_measurements, minimum=1,
                  hint="(GNS measurements before the first decision)")
        check_float("AdaptiveBatchSize", "target_ratio", target_ratio, low=0.0, low_open=True)
        check_float("AdaptiveBatchSize", "hysteresis", hysteresis, low=0.0)
        check_bool("AdaptiveBatchSize", "accumulate", accumulate)
        if isinstance(max_growth, bool) or not isinstance(max_growth, (int, float)) or not max_growth > 1:
            raise ValueError(f"AdaptiveBatchSize: max_growth (largest growth factor of the global batch per decision) "
                             f"must be a number > 1, e.g. 2.0 (math.inf: no cap), got {max_growth!r}.")
        if accumulate and max_per_device_batch_size is None:
            raise ValueError("AdaptiveBatchSize: accumulate=True needs max_per_device_batch_size (the memory limit "
                             "beyond which micro-batches are accumulated).")
        if noise_scale is not None:
            _check_noise_scale(noise_scale, "noise_scale", TypeError)
        self.max_batch_size, self.every_n_steps = max_batch_size, every_n_steps
        self.start_step = every_n_steps if start_step is None else start_step
        self.target_ratio, self.hysteresis = target_ratio, hysteresis
        self.max_per_device_batch_size, self.allow_accumulation = max_per_device_batch_size, accumulate
        self.multiple_of = multiple_of
        self.min_measurements, self.max_growth = min_measurements, float(max_growth)
        self.noise_scale = noise_scale
        self._source: Any = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._source = self.noise_scale
        if self._source is None:
            candidates = [cb for cb in trainer.callbacks if cb is not self and hasattr(type(cb), "b_simple")]
            if not candidates:
                raise ValueError("AdaptiveBatchSize: no GradientNoiseScale in trainer.callbacks; add one (e.g. "
                                 "lightning_sgd.callbacks.GradientNoiseScale()) or pass noise_scale=...")
            self._source = _check_noise_scale(candidates[0], f"the callback {type(candidates[0]).__name__}",
                                              ValueError)

    def _read_estimate(self) -> tuple[float, float, int]:
        """``(b_simple, grad_sq_norm, measured)`` of the source; NaN / 0 for what cannot be read."""
        values: list[float] = []
        for name in ("b_simple", "grad_sq_norm", "measured"):
            try:
                values.append(float(getattr(self._source, name)))
            except (AttributeError, TypeError, ValueError, ZeroDivisionError):
                values.append(math.nan)
        measured = int(values[2]) if math.isfinite(values[2]) else 0
        return values[0], values[1], measured

    def _untrusted(self, b_simple: float, grad_sq_norm: float, measured: int) -> str:
        """Why the estimate cannot drive a decision yet (``""``: it can)."""
        if measured < self.min_measurements:
            return (f"B_simple not trusted yet: {measured} GNS measurement(s), fewer than min_measurements="
                    f"{self.min_measurements}")
        if not (math.isfinite(grad_sq_norm) and grad_sq_norm > 0):
            return (f"B_simple not trusted: the smoothed |G|^2 is {grad_sq_norm:.4g}, not finite and positive (noise "
                    f"drowns the gradient; B_simple {b_simple:.4g} is no batch-size estimate)")
        if not (math.isfinite(b_simple) and b_simple > 0):
            return f"no usable B_simple estimate ({b_simple:.4g})"
        return ""

    @override
    def _propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, boundary: str
                 ) -> tuple[int, int, str] | None:
        step = trainer.global_step
        if boundary != "step" or step < self.start_step or (step - self.start_step) % self.every_n_steps:
            return None
        assert self.batch_size is not None and self.accumulate is not None
        world, current = trainer.world_size, self.global_batch_size(trainer)
        # rank 0's estimate decides
        b_simple, grad_sq_norm, measured = trainer.strategy.broadcast(self._read_estimate(), src=0)
        proposal, target = None, math.nan
        reason = self._untrusted(b_simple, grad_sq_norm, measured)
        if not reason:
            target = min(self.max_batch_size, self.target_ratio * b_simple)
            if target < (1 + self.hysteresis) * current:
                reason = (f"target {target:.4g} (B_simple {b_simple:.4g}) below (1 + {self.hysteresis:g}) x current "
                          f"global batch {current}")
        if not reason:
            wanted = min(target, self.max_growth * current)
            per_device, accumulate, note = split_global_batch(
                math.floor(wanted), world, self.max_per_device_batch_size, self.allow_accumulation)
            per_device = max(self.multiple_of, per_device // self.multiple_of * self.multiple_of)
            if per_device * world * accumulate <= current:
                reason = (f"target {wanted:.4g} rounds to no growth (multiple_of={self.multiple_of}, "
                          f"{note or 'no limit'})")
            else:
                if wanted < target:
                    capped = f" capped at max_growth={self.max_growth:g} x {current} = {wanted:.4g}"
                elif target == self.max_batch_size:
                    capped = " (max_batch_size)"
                else:
                    capped = ""
                reason = f"grow towards B_simple {b_simple:.4g} x {self.target_ratio:g} = target {target:.4g}{capped}"
                reason += f"; {note}" if note else ""
                proposal = (per_device, accumulate, reason)
        grew = proposal is not None
        self._log(trainer, {"batch_size/b_simple": b_simple, "batch_size/target": target, "batch_size/grew": grew,
                            "batch_size/global": current, "batch_size/gns_measurements": measured})
        if not grew:
            rank_zero_info(f"AdaptiveBatchSize: step {step}: keep global batch {current}; reason: {reason}")
        return proposal


_ESTIMATE_ATTRIBUTES = ("b_simple", "grad_sq_norm", "measured")


def _check_noise_scale(source: Any, what: str, error: type[Exception]) -> Any:
    """``source`` if it exposes what AdaptiveBatchSize reads; else ``error`` naming what is missing."""
    missing = [name for name in _ESTIMATE_ATTRIBUTES if not hasattr(source, name)]
    if missing:
        raise error(f"AdaptiveBatchSize: {what} lacks {', '.join(missing)}; the noise-scale source must expose "
                    f"b_simple, grad_sq_norm (the smoothed |G|^2) and measured (the number of measurements), as "
                    f"lightning_sgd.callbacks.GradientNoiseScale does.")
    return source
