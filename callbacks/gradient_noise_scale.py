"""GradientNoiseScale: B_simple, B_noise and the critical batch size, measured during training.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training". The estimators are pure functions in
:mod:`lightning_sgd.noise_scale`, the sources of the two batch sizes small classes in
:mod:`lightning_sgd.gns_sources`; this callback schedules, smooths, logs and checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_sgd.batches import batch_size
from lightning_sgd.checks import check_bool, check_choice, check_float, check_int, missing_state_keys
from lightning_sgd.compat import Callback
from lightning_sgd.core import log_metrics
from lightning_sgd.gns_sources import (
    AccumulationSource,
    BNoiseEstimator,
    DDPSource,
    NoiseScaleSource,
    ParamLayout,
    PerExampleSource,
    Skip,
    SourceFailed,
    SplitSource,
    StrategyRecordSource,
    has_batchnorm,
)
from lightning_sgd.module_loss import ModuleLoss
from lightning_sgd.noise_scale import NoiseScaleEMA, NoiseScaleSample, regime
from lightning_sgd.schedules import Schedule, as_schedule

__all__ = ["GradientNoiseScale"]

_SOURCES = ("auto", "ddp", "accumulation", "per_example", "split")
_ENGINES = ("auto", "hooks", "vmap")
_WHO = "GradientNoiseScale"


class GradientNoiseScale(Callback):
    r"""Measure the gradient noise scale B_simple = tr Σ / |G|² (and optionally B_noise) during training.

    Every measurement takes squared norms of gradients of the **same step** (same parameters) at two batch sizes,
    turns them into unbiased samples of |G|² and tr Σ, and feeds two separate bias-corrected EMAs; B_simple is the
    ratio of the EMAs, with a standard error from the spread of the samples (delta method,
    :class:`lightning_sgd.noise_scale.NoiseScaleEMA`). Norms are measured in ``on_before_optimizer_step``, after
    AMP unscaling and before gradient clipping.

    **What the LightningModule needs:** Lightning's own ``training_step`` (returning the loss or ``{"loss": loss}``)
    and automatic optimization, with batches of any structure. The loss must be a **mean over the examples**
    (checked once, at the first measurement of a source that re-runs the module's code: ``ValueError`` for a sum).
    Those sources call ``training_step`` through :class:`lightning_sgd.module_loss.ModuleLoss` (logging muted, RNG
    forked, buffers and modes restored, ``.grad`` untouched), so measuring never changes the training trajectory; a
    module that also implements ``split_batch``/``forward``/``loss`` is measured through those instead.

    **Sources** (``source``; the classes are in :mod:`lightning_sgd.gns_sources`): ``"ddp"`` (every micro-batch
    of every rank vs the all-reduced gradient, or one rank's step vs all from the record of
    :class:`lightning_sgd.plugins.GradStatsDDPStrategy`), ``"accumulation"`` (each micro-batch vs their mean, no
    extra FLOPs), ``"per_example"`` (per-example norms vs the batch, from layer hooks on the training backward or
    from ``vmap``), ``"split"`` (``split_parts`` equal parts of the batch vs the batch), or a
    :class:`lightning_sgd.gns_sources.NoiseScaleSource` object of your own. ``"auto"`` (default): ``"ddp"`` with
    more than one process, else ``"accumulation"`` when accumulating, else ``"per_example"``, and ``"split"``
    instead of per_example for models with BatchNorm (per-example gradients in train mode are ill-defined). On one
    device per-example is preferred: with the hook engine it needs no second pass, and b = 1 is the largest gap
    between the two batch sizes (its tr Σ samples are far less noisy than a 4-part split's, its |G|² samples about
    as noisy, and those dominate B_simple's error when B_simple ≫ the batch: BENCHMARKS.md).
    Override :meth:`resolve_source` to choose differently and :meth:`fallback_source` to change what happens when a
    source cannot run the model (default: per_example -> split -> stop measuring, each switch with one warning;
    ``skipped["failed"]`` counts the measurements not taken). Skips are counted, never raised mid-run:
    ``skipped["nonfinite"]`` (non-finite gradients), ``["too_few"]`` (a batch of one example), ``["stale"]`` (a
    strategy record from another step).

    Args:
        schedule: when to measure (``int`` n = every n steps, or a :class:`lightning_sgd.schedules.Schedule`).
            ``None``: every step for the micro-batch sources (nearly free), every 50 steps for per_example/split
            (a measured step re-runs or extends the batch's backward).
        source: ``"auto"``, ``"ddp"``, ``"accumulation"``, ``"per_example"``, ``"split"`` or a source object.
        split_parts: parts for the ``"split"`` source (>= 2).
        chunk_size: examples per ``vmap`` chunk for the ``"per_example"`` source (memory ≈ chunk × #params).
        beta: EMA decay per measurement.
        per_layer: also estimate B_simple per layer (the module owning the parameters), logged under
            ``gns/layer/<name>/...``. Not available from a strategy's record.
        b_noise_schedule: when to also estimate B_noise = tr(HΣ)/(GᵀHG) with Hessian-vector products
            (:class:`lightning_sgd.gns_sources.BNoiseEstimator`); ``None`` disables it.
        b_noise_groups: group gradients for the B_noise estimate (>= 2); a batch needs >= 2 × this many examples.
        engine: how the ``"per_example"`` source gets per-example norms: ``"hooks"``, ``"vmap"`` or ``"auto"``
            (hooks when every layer is supported, one process and no accumulation, and timed faster than vmap once
            on the first measured batch; else vmap).
        layers: ``"all"``, or ``"norm"`` for |G|² and tr Σ over the normalization layers' parameters only (Gray et
            al. 2024; per_example source only, which ``"auto"`` then picks): nearly free with the hook engine, and
            a different quantity from the whole model's B_simple (see :class:`PerExampleSource`).

    Logs (every logger, at the measured step, rank 0): ``gns/grad_sq_norm`` (|G|²), ``gns/trace_cov`` (tr Σ),
    ``gns/b_simple``, ``gns/b_simple_se`` (its standard error), ``gns/b_noise`` and ``gns/b_noise_se`` (when
    enabled), ``gns/batch_size`` (the training batch, all devices and micro-batches) and ``gns/regime`` =
    log2(batch_size / B_simple): below 0 the run is noise-dominated (a larger batch still cuts steps almost
    linearly), above 0 curvature-dominated. The smoothed values are the attributes ``b_simple``, ``b_simple_se``,
    ``grad_sq_norm``, ``trace_cov``, ``b_noise``, ``b_noise_se``.

    Raises:
        ValueError: at setup, on a source that cannot work for this run (e.g. ``"ddp"`` on one process,
            ``"per_example"`` with BatchNorm); at the first measurement, a loss that is not a mean over examples.
    """

    def __init__(
        self,
        schedule: int | Schedule | None = None,
        source: str | NoiseScaleSource = "auto",
        split_parts: int = 4,
        chunk_size: int | None = 64,
        beta: float = 0.95,
        per_layer: bool = False,
        b_noise_schedule: int | Schedule | None = None,
        b_noise_groups: int = 4,
        engine: str = "auto",
        layers: str = "all",
    ) -> None:
        if not isinstance(source, (str, NoiseScaleSource)):
            raise TypeError(f"{_WHO}: source must be one of {_SOURCES} or a NoiseScaleSource instance, got "
                            f"{source!r} ({type(source).__name__}).")
        self.source = source if isinstance(source, NoiseScaleSource) else check_choice(_WHO, "source", source,
                                                                                         _SOURCES)
        self.engine = check_choice(_WHO, "engine", engine, _ENGINES)
        self.layers = check_choice(_WHO, "layers", layers, ("all", "norm"))
        self.split_parts = check_int(_WHO, "split_parts", split_parts, minimum=2)
        self.chunk_size = check_int(_WHO, "chunk_size", chunk_size, minimum=1, optional=True)
        self.beta = check_float(_WHO, "beta", beta, low=0.0, high=1.0, high_open=True)
        self.b_noise_groups = check_int(_WHO, "b_noise_groups", b_noise_groups, minimum=2)
        self.per_layer = check_bool(_WHO, "per_layer", per_layer)
        self.schedule = None if schedule is None else as_schedule(schedule, _WHO, "schedule")
        self.b_noise_schedule = (None if b_noise_schedule is None
                                 else as_schedule(b_noise_schedule, _WHO, "b_noise_schedule"))
        self.ema = NoiseScaleEMA(self.beta)
        self.layer_ema: dict[str, NoiseScaleEMA] = {}
        self.b_noise_estimator = BNoiseEstimator(self.b_noise_groups, self.beta)
        self.measured = 0
        self.skipped = {"nonfinite": 0, "stale": 0, "too_few": 0, "failed": 0}
        self.last_sample: NoiseScaleSample | None = None
        self.last_metrics: dict[str, float] = {}
        self.active_source: NoiseScaleSource | None = None  # the source measuring now (None: none, or given up)
        self._loss: ModuleLoss | None = None
        self._schedule: Schedule | None = None
        self._batch: Any = None  # this step's (last micro-)batch
        self._step, self._step_examples, self._last_step = -1, 0, -1

    # ------------------------------------------------------------------------------------------- public values
    @property
    def b_simple(self) -> float:
        """Smoothed B_simple = EMA(tr Σ) / EMA(|G|²); NaN before the first measurement."""
        return self.ema.b_simple

    @property
    def b_simple_se(self) -> float:
        """Standard error of :attr:`b_simple` (delta method over the EMA's samples); NaN until defined."""
        return self.ema.b_simple_se

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed unbiased |G|²."""
        return self.ema.grad_sq_norm

    @property
    def trace_cov(self) -> float:
        """Smoothed unbiased tr Σ."""
        return self.ema.trace_cov

    @property
    def b_noise_ema(self) -> NoiseScaleEMA:
        """The B_noise EMA: (GᵀHG, tr HΣ) in its (``grad_sq_norm``, ``trace_cov``) slots."""
        return self.b_noise_estimator.ema

    @property
    def b_noise(self) -> float:
        """Smoothed B_noise = EMA(tr HΣ) / EMA(GᵀHG); NaN unless ``b_noise_schedule`` is set and has run."""
        return self.b_noise_ema.b_simple

    @property
    def b_noise_se(self) -> float:
        """Standard error of :attr:`b_noise`; NaN until defined."""
        return self.b_noise_ema.b_simple_se

    @property
    def source_in_use(self) -> str | None:
        """The source this run measures with (its ``name``, after ``"auto"`` and any fallback); ``None`` before
        setup or after the measurements were given up."""
        return None if self.active_source is None else self.active_source.name

    @property
    def engine_in_use(self) -> str | None:
        """For the per_example source, ``"hooks"`` or ``"vmap"`` (after any fallback); else ``None``."""
        return self.active_source.engine_in_use if isinstance(self.active_source, PerExampleSource) else None


    # ---------------------------------------------------------------------------------------------------- setup
    def resolve_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> NoiseScaleSource:
        """The source for this run: the ``source`` object, or the one the ``source`` name stands for (``"auto"``
        resolved as documented). Override to choose differently."""
        if isinstance(self.source, NoiseScaleSource):
            return self.source
        name = self.source
        if name == "auto":  # manual optimization: no gradients accumulated by Lightning to read
            name = ("per_example" if self.layers == "norm" or not pl_module.automatic_optimization
                    else "ddp" if trainer.world_size > 1
                    else "accumulation" if trainer.accumulate_grad_batches > 1 else "per_example")
            if name == "per_example" and self.layers == "all" and has_batchnorm(pl_module):
                name = "split"
        if name == "ddp":
            return StrategyRecordSource() if hasattr(trainer.strategy, "latest_grad_stats") else DDPSource()
        if name == "per_example":
            return PerExampleSource(self.engine, self.chunk_size, self.layers)
        return AccumulationSource() if name == "accumulation" else SplitSource(self.split_parts)

    def fallback_source(self, failed: NoiseScaleSource, error: SourceFailed) -> NoiseScaleSource | None:
        """What to measure with when ``failed`` cannot run this model (``None``: stop measuring for the run).
        Default: per_example -> split (not for ``layers="norm"``: split has no such mode), nothing after split."""
        fall_back = isinstance(failed, PerExampleSource) and self.layers == "all"
        return SplitSource(self.split_parts) if fall_back else None

    def _start_source(self, source: NoiseScaleSource, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._loss is not None
        if self.layers == "norm" and not isinstance(source, PerExampleSource):
            raise ValueError(f"{_WHO}(layers='norm') needs the per_example source (per-example gradients of the "
                             f"normalization layers), not {source.name!r}: use source='per_example' or 'auto'.")
        source.setup(trainer, pl_module, ParamLayout.of(pl_module, self.per_layer), self._loss)
        self.active_source = source

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._loss = ModuleLoss(pl_module, _WHO)
        source = self.resolve_source(trainer, pl_module)
        if source.reruns_module or self.b_noise_schedule is not None:
            self._loss.check_usable()  # the module's code is re-run: not a training_step that steps optimizers
        self._start_source(source, trainer, pl_module)
        self._schedule = self.schedule or as_schedule(source.default_interval)
        self.b_noise_estimator.start()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.b_noise_schedule is not None:  # the loader's batch size is known now, before the first step
            self.b_noise_estimator.check_batch(getattr(trainer.train_dataloader, "batch_size", None))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active_source is not None:
            self.active_source.teardown()
        self._batch = None

    # --------------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step, n = trainer.global_step, batch_size(batch, _WHO)
        if step != self._step:  # the first micro-batch of this optimizer step
            self._step, self._step_examples = step, 0
        self._step_examples, self._batch = self._step_examples + n, batch
        if self.active_source is not None and self._schedule is not None:
            self.active_source.start_batch(trainer, pl_module, batch, n, self._schedule(step))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.active_source is not None:
            self.active_source.before_backward(trainer, loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active_source is not None:
            self.active_source.after_backward(trainer)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if step == self._last_step:  # several optimizers: measure once per step
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        if self._schedule is not None and self._schedule(step):
            metrics.update(self._measure(trainer, pl_module))
        if self.b_noise_schedule is not None and self.b_noise_schedule(step):
            metrics.update(self._counted(self.b_noise_estimator.measure, pl_module, self._loss, self._batch))
        if self.active_source is not None:
            self.active_source.end_step()
        self._batch = None
        if metrics:
            self.last_metrics = metrics
            log_metrics(trainer, metrics, step)

    # ----------------------------------------------------------------------------------------------- measuring
    def _counted(self, measure: Any, *args: Any) -> Any:
        """``measure(*args)``, with a :class:`Skip` counted in ``skipped`` (and ``{}`` returned)."""
        try:
            return measure(*args)
        except Skip as skip:
            self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
            return {}

    def _samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, NoiseScaleSample]:
        """The active source's samples; on :class:`SourceFailed`, one warning and :meth:`fallback_source`, tried on
        the same step, until a source measures or none is left (``skipped["failed"]``)."""
        while self.active_source is not None:
            source = self.active_source
            try:
                return source.samples(trainer, pl_module, self._batch)
            except SourceFailed as err:
                source.teardown()
                nxt = self.fallback_source(source, err)
                if nxt is None:
                    self.active_source = None
                    rank_zero_warn(f"{_WHO}: the {source.name} source cannot measure this model either ({err}); no "
                                   "more measurements in this run (counted in skipped['failed']).")
                    break
                rank_zero_warn(f"{_WHO}: the {source.name} source cannot measure this model ({err}); measuring with "
                               f"source={nxt.name!r} from now on. Pass source={nxt.name!r} to skip this attempt.")
                self._start_source(nxt, trainer, pl_module)
        raise Skip("failed")

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        samples = self._counted(self._samples, trainer, pl_module)
        if not samples:
            return {}
        total = samples.pop("")
        if not (math.isfinite(total.grad_sq_norm) and math.isfinite(total.trace_cov)):
            self.skipped["nonfinite"] += 1
            return {"gns/skipped_nonfinite": float(self.skipped["nonfinite"])}
        if self.active_source is not None and self.active_source.reruns_module and self._loss is not None:
            self._loss.check_mean(self._batch)  # once per run: these sources' numbers assume a mean loss
        self.ema.update(total)
        self.last_sample = total
        self.measured += 1
        batch = float(self._step_examples * trainer.world_size)
        metrics = {"gns/grad_sq_norm": self.grad_sq_norm, "gns/trace_cov": self.trace_cov,
                   "gns/b_simple": self.b_simple, "gns/b_simple_se": self.b_simple_se, "gns/batch_size": batch,
                   "gns/regime": regime(batch, self.b_simple)}
        for layer, sample in samples.items():
            if math.isfinite(sample.grad_sq_norm) and math.isfinite(sample.trace_cov):
                ema = self.layer_ema.setdefault(layer, NoiseScaleEMA(self.beta))
                ema.update(sample)
                metrics.update({f"gns/layer/{layer}/grad_sq_norm": ema.grad_sq_norm,
                                f"gns/layer/{layer}/trace_cov": ema.trace_cov,
                                f"gns/layer/{layer}/b_simple": ema.b_simple})
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    # --------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "layer_ema": {k: v.state_dict() for k, v in self.layer_ema.items()},
            "b_noise_ema": self.b_noise_ema.state_dict(),
            "measured": self.measured,
            "skipped": dict(self.skipped),
            # the per-example engine this run settled on (timed once under engine="auto", or after a fallback):
            # a resumed run measures with the same one, so its numbers round exactly as the uninterrupted run's
            **({"engine": self.engine_in_use} if self.engine_in_use is not None else {}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the EMAs and counters. Only ``"ema"`` is required; a state from a version without them gets the
        documented defaults: no per-layer EMAs, a fresh B_noise EMA, ``measured`` = the EMA's count, no skips (and
        an EMA without the standard error's keys restarts its second moments: :class:`NoiseScaleEMA`).

        A ``beta`` other than the checkpoint's keeps the history and applies from the next measurement on, with a
        warning: each EMA tracks the total weight it carries, so its debiased value stays a properly normalized
        weighted mean of the samples when β changes in the middle of a run.
        """
        missing_state_keys(_WHO, state_dict, ["ema"], self.state_key)
        for name in ("ema", "b_noise_ema"):
            if name in state_dict:
                missing_state_keys(f"{_WHO} ({name})", state_dict[name], NoiseScaleEMA.STATE_KEYS, self.state_key)
        self.ema.load_state_dict(state_dict["ema"])
        self.layer_ema = {}
        for k, v in state_dict.get("layer_ema", {}).items():
            self.layer_ema[k] = NoiseScaleEMA(self.beta)
            self.layer_ema[k].load_state_dict(v)
        self.b_noise_estimator.ema = NoiseScaleEMA(self.beta)
        if "b_noise_ema" in state_dict:
            self.b_noise_ema.load_state_dict(state_dict["b_noise_ema"])
        self.measured = int(state_dict.get("measured", self.ema.count))
        if "engine" in state_dict and isinstance(self.active_source, PerExampleSource):
            self.active_source.use_engine(state_dict["engine"])
        self.skipped = {**self.skipped, **state_dict.get("skipped", {})}
        saved_beta = self.ema.beta
        for ema in (self.ema, self.b_noise_ema, *self.layer_ema.values()):
            ema.beta = self.beta
        if saved_beta != self.beta and self.ema.count:
            rank_zero_warn(f"{_WHO}: the checkpoint's EMAs were built with beta={saved_beta}; this callback has "
                           f"beta={self.beta}, which applies from the next measurement on (the {self.ema.count} "
                           "measurements so far keep their weights).")
