"""Learning-rate scaling with the global batch size and gradual warmup (Goyal et al. 2017).

The configured learning rate ``eta_ref`` is taken to be tuned for a reference batch ``B_ref``. With the global batch
``B = devices * per-device batch * accumulate_grad_batches`` the target learning rate is

.. math::  \\eta = \\eta_{ref} \\cdot s, \\qquad s = B / B_{ref} \\ (\\text{linear}), \\ \\sqrt{B / B_{ref}}
    \\ (\\text{sqrt}), \\ 1 \\ (\\text{none}),

reached by a linear warmup over ``T`` optimizer steps (``warmup_steps``, or ``warmup_epochs`` times the optimizer
steps per epoch): the learning rate of optimizer step ``t`` (0-based) is ``raw_t * w(t)`` with

.. math::  w(t) = f_0 + (1 - f_0) \\min(1, t / T),

where ``raw_t`` is the (scaled) learning rate the user's own scheduler would give at step ``t`` (constant without
one) and ``f_0`` the start factor: by default ``min(1, 1/s)``, i.e. warmup starts from ``eta_ref`` as in Goyal et
al.; ``warmup_start_factor=0`` warms up from zero.

How it composes with another scheduler: at the start of training the callback multiplies every parameter group's
``lr`` (and ``initial_lr``, ``max_lr``, ``min_lr`` when present) and each scheduler's ``base_lrs`` (and
CyclicLR's ``max_lrs``) by ``s``; the user's scheduler keeps stepping as configured, always seeing the un-warmed
``raw`` learning rate (its scheduler object is wrapped so that recursive schedulers such as ``StepLR`` never
compound the warmup factor); after ``T`` steps ``w = 1`` and the user's schedule is left alone. The value in
``param_group["lr"]`` between steps is the one the next step uses, so ``LearningRateMonitor`` shows the warmup.
The step counter and raw learning rates are part of the callback state, so a resumed run continues with exactly
the same learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_sgd.checks import check_choice, check_float, check_int, missing_state_keys
from lightning_sgd.compat import Callback

__all__ = ["LRWarmupScaling", "rescale_learning_rates", "scale_factor", "warmup_factor"]

RULES = ("linear", "sqrt", "none")
_SCALED_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def scale_factor(rule: str, batch_size: int, reference_batch_size: int) -> float:
    """The LR multiplier ``s`` of ``rule`` for global batch ``batch_size`` relative to ``reference_batch_size``."""
    ratio = batch_size / reference_batch_size
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def rescale_learning_rates(optimizers: Iterable[Optimizer], schedulers: Iterable[Any], ratio: float) -> None:
    """Multiply the learning rates of ``optimizers`` and ``schedulers`` by ``ratio``, in every place they live: each
    param group's ``lr`` (and ``initial_lr``, ``max_lr``, ``min_lr`` when present) and each scheduler's
    ``base_lrs`` (CyclicLR's ``max_lrs``, the ``_last_lr`` it reports), so a scheduler keeps running on top."""
    if ratio == 1.0:
        return
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in _SCALED_KEYS:
                value = group.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    group[key] = value * ratio
    for scheduler in schedulers:
        if isinstance(scheduler, _WarmupScheduler):
            scheduler = scheduler.scheduler
        for attribute in ("base_lrs", "max_lrs", "_last_lr"):
            values = getattr(scheduler, attribute, None)
            if isinstance(values, list):
                setattr(scheduler, attribute, [lr * ratio for lr in values])


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """``w(t) = f0 + (1 - f0) min(1, t / T)`` for 0-based optimizer step ``t`` (1 when ``T == 0``)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


class _WarmupScheduler:
    """Wraps a user's LR scheduler: it steps on the raw (un-warmed) learning rates, then the warmup is re-applied.

    Checkpoints see the wrapped scheduler's own ``state_dict``, so they stay loadable without this callback.
    """

    def __init__(self, scheduler: Any, owner: LRWarmupScaling, index: int) -> None:
        self.scheduler = scheduler
        self._owner = owner
        self._index = index

    def step(self, *args: Any, **kwargs: Any) -> None:
        self._owner._set_raw(self._index)
        self.scheduler.step(*args, **kwargs)
        self._owner._capture_raw(self._index)
        self._owner._apply(self._index)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # optimizer, get_last_lr, last_epoch, ...
        return getattr(self.__dict__["scheduler"], name)


class LRWarmupScaling(Callback):
    """Scale the learning rate with the global batch size (linear / sqrt / none) and warm it up linearly.

    Args:
        reference_batch_size: ``B_ref``, the global batch size the configured learning rate was tuned for.
        rule: ``"linear"`` (``eta B / B_ref``), ``"sqrt"`` (``eta sqrt(B / B_ref)``, for adaptive optimizers) or
            ``"none"`` (warmup only).
        warmup_steps: warmup length in optimizer steps (give this or ``warmup_epochs``; neither: no warmup).
        warmup_epochs: warmup length in epochs (Goyal et al.: 5), converted with the optimizer steps per epoch.
        warmup_start_factor: ``w(0)`` as a fraction of the target LR; ``None``: ``min(1, 1/s)`` (start at eta_ref).
        batch_size: the per-device batch size; ``None`` reads it from the train DataLoader.

    Raises ``ValueError`` for ``reference_batch_size <= 0``, an unknown rule, both or negative warmup lengths, and
    (when training starts) a warmup longer than the whole run.
    """

    def __init__(
        self,
        reference_batch_size: int = 256,
        rule: str = "linear",
        warmup_steps: int | None = None,
        warmup_epochs: float | None = None,
        warmup_start_factor: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        who = "LRWarmupScaling"
        self.reference_batch_size = check_int(who, "reference_batch_size", reference_batch_size, minimum=1,
                                              hint="(B_ref: the global batch size the configured LR was tuned for.)")
        self.rule = check_choice(who, "rule", rule, RULES)
        if warmup_steps is not None and warmup_epochs is not None:
            raise ValueError("LRWarmupScaling: give warmup_steps or warmup_epochs, not both.")
        self.warmup_steps = check_int(who, "warmup_steps", warmup_steps, minimum=0, optional=True)
        self.warmup_epochs = check_float(who, "warmup_epochs", warmup_epochs, low=0.0, optional=True)
        self.warmup_start_factor = check_float(who, "warmup_start_factor", warmup_start_factor, low=0.0,
                                               high=1.0, optional=True, hint="(w(0) as a fraction of the target LR.)")
        self.batch_size = check_int(who, "batch_size", batch_size, minimum=1, optional=True,
                                    hint="(the per-device batch size; None reads it from the train DataLoader.)")
        # Resumable state (state_dict): None until training starts.
        self.scale: float | None = None
        self.global_batch_size: int | None = None
        self.steps: list[int] = []  # optimizer steps taken, per optimizer
        self.raw_lrs: list[list[float]] = []  # un-warmed LR of each param group, per optimizer
        # Per-run state.
        self.resolved_warmup_steps = 0
        self._optimizers: list[Optimizer] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------------------------------------------ the formula
    @property
    def start_factor(self) -> float:
        if self.warmup_start_factor is not None:
            return self.warmup_start_factor
        return min(1.0, 1.0 / self.scale) if self.scale else 1.0

    def factor(self, step: int) -> float:
        """The warmup multiplier ``w(step)`` of the current run."""
        return warmup_factor(step, self.resolved_warmup_steps, self.start_factor)

    # ------------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit starts unscaled; a checkpoint (restored after setup) brings its own state
            self.scale, self.global_batch_size, self.steps, self.raw_lrs = None, None, [], []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = list(trainer.optimizers)
        global_batch = self._per_device_batch(trainer) * trainer.world_size * trainer.accumulate_grad_batches
        self.resolved_warmup_steps = self._resolve_warmup_steps(trainer)
        if self.scale is None:  # a fresh run (a resumed one restored scale, raw LRs and step counters)
            self.global_batch_size = global_batch
            self.scale = scale_factor(self.rule, global_batch, self.reference_batch_size)
            rescale_learning_rates(self._optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], self.scale)
            self.steps = [0] * len(self._optimizers)
            self.raw_lrs = [[group["lr"] for group in opt.param_groups] for opt in self._optimizers]
            rank_zero_info(f"LRWarmupScaling: global batch {global_batch} = {trainer.world_size} device(s) x "
                           f"per-device batch x {trainer.accumulate_grad_batches} accumulation; {self.rule} rule "
                           f"scales the LR by {self.scale:.4g}; warmup over {self.resolved_warmup_steps} steps.")
        elif global_batch != self.global_batch_size:
            rank_zero_warn(f"LRWarmupScaling: resumed with global batch {global_batch}, the run was scaled for "
                           f"{self.global_batch_size}; keeping the original scale {self.scale:.4g}.")
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, _WarmupScheduler):
                config.scheduler = _WarmupScheduler(config.scheduler, self, self._index_of(config.scheduler.optimizer))
        if len(self.steps) != len(self._optimizers) or len(self.raw_lrs) != len(self._optimizers):
            raise ValueError(f"LRWarmupScaling: the checkpoint's state is for {len(self.steps)} optimizer(s), the "
                             f"module has {len(self._optimizers)}; resume with the same configure_optimizers.")
        for index, optimizer in enumerate(self._optimizers):
            self._handles.append(optimizer.register_step_post_hook(self._post_step_hook(index)))
            self._apply(index)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, _WarmupScheduler):
                config.scheduler = config.scheduler.scheduler

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "global_batch_size": self.global_batch_size, "steps": list(self.steps),
                "raw_lrs": [list(lrs) for lrs in self.raw_lrs], "rule": self.rule,
                "reference_batch_size": self.reference_batch_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scale, the step counters and the raw learning rates; all four are required (without any of
        them the resumed learning rates would differ from the uninterrupted run's)."""
        missing_state_keys("LRWarmupScaling", state_dict, ["scale", "global_batch_size", "steps", "raw_lrs"],
                           self.state_key)
        self.scale = state_dict["scale"]
        self.global_batch_size = state_dict["global_batch_size"]
        self.steps = list(state_dict["steps"])
        self.raw_lrs = [list(lrs) for lrs in state_dict["raw_lrs"]]
        # The optimizers' LRs in the checkpoint are already scaled: a changed rule or B_ref cannot apply to them.
        changed = [f"{name}={state_dict[name]!r} -> {getattr(self, name)!r}"
                   for name in ("rule", "reference_batch_size")
                   if name in state_dict and state_dict[name] != getattr(self, name)]
        if changed and self.scale is not None:
            rank_zero_warn(f"LRWarmupScaling: resumed with {', '.join(changed)}; the checkpoint's learning rates were "
                           f"scaled by {self.scale:.4g} and keep that scale. Start a new run to scale them otherwise.")

    # -------------------------------------------------------------------------------------------------- internals
    def _post_step_hook(self, index: int) -> Any:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            self.steps[index] += 1
            self._apply(index)

        return hook

    def _apply(self, index: int) -> None:
        w = self.factor(self.steps[index])
        for group, raw in zip(self._optimizers[index].param_groups, self.raw_lrs[index]):
            group["lr"] = raw * w

    def _set_raw(self, index: int) -> None:
        for group, raw in zip(self._optimizers[index].param_groups, self.raw_lrs[index]):
            group["lr"] = raw

    def _capture_raw(self, index: int) -> None:
        self.raw_lrs[index] = [group["lr"] for group in self._optimizers[index].param_groups]

    def _index_of(self, optimizer: Optimizer) -> int:
        for index, candidate in enumerate(self._optimizers):
            if candidate is optimizer:
                return index
        raise RuntimeError("LRWarmupScaling: a scheduler's optimizer is not among trainer.optimizers.")

    def _per_device_batch(self, trainer: pl.Trainer) -> int:
        if self.batch_size is not None:
            return self.batch_size
        loader = trainer.train_dataloader
        size = getattr(loader, "batch_size", None)
        if size is None:
            size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if not isinstance(size, int) or size <= 0:
            raise ValueError("LRWarmupScaling: cannot read the per-device batch size from the train DataLoader; "
                             "pass batch_size=... explicitly.")
        return size

    def _resolve_warmup_steps(self, trainer: pl.Trainer) -> int:
        total = trainer.estimated_stepping_batches
        if self.warmup_epochs is not None:
            batches = trainer.num_training_batches
            if not math.isfinite(batches):
                raise ValueError("LRWarmupScaling: warmup_epochs needs a sized train DataLoader; use warmup_steps.")
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            steps = round(self.warmup_epochs * steps_per_epoch)
        else:
            steps = self.warmup_steps or 0
        if math.isfinite(total) and steps > total:
            raise ValueError(f"LRWarmupScaling: the warmup ({steps} optimizer steps) is longer than training "
                             f"({int(total)} steps); shorten the warmup or train longer.")
        return steps
