"""GradientDiversity: Yin et al.'s gradient diversity and the batch-size bound it implies, during training.

Yin et al. 2018, "Gradient Diversity: a Key Ingredient for Scalable Distributed Learning". The maths is in
:mod:`lightning_sgd.diversity`; the per-example gradients come from the engines shared with GradientNoiseScale
(:mod:`lightning_sgd.per_example`, :mod:`lightning_sgd.per_example_hooks`), run on the module's own loss through
:class:`lightning_sgd.module_loss.ModuleLoss`.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils._pytree import tree_map
from typing_extensions import override

from lightning_sgd.batches import batch_size, flatten_batch
from lightning_sgd.checks import check_bool, check_choice, check_float, check_int, missing_state_keys
from lightning_sgd.compat import Callback
from lightning_sgd.core import log_metrics, per_example_engine
from lightning_sgd.diversity import batch_size_bound, diversity_from_stats
from lightning_sgd.module_loss import ModuleLoss
from lightning_sgd.per_example import per_example_gradient_stats, trainable_parameters
from lightning_sgd.per_example_hooks import hook_gradient_stats, validate
from lightning_sgd.schedules import Schedule, as_schedule

__all__ = ["GradientDiversity"]

_WHO = "GradientDiversity"


class GradientDiversity(Callback):
    r"""Measure the gradient diversity Δ(w) = Σᵢ|gᵢ|² / |Σᵢgᵢ|² over n examples, on a schedule.

    .. math::  \Delta(w) = \frac{\sum_{i=1}^n |\nabla f_i(w)|^2}{|\sum_{i=1}^n \nabla f_i(w)|^2},
               \qquad B_\text{bound} = \delta\, n\, \Delta(w) + 1

    The n examples are either the current training batch (``probe_size=None``; measured at the parameters the
    step's gradient is taken at, in ``on_train_batch_start``) or a fixed probe set of ``probe_size`` training
    examples drawn once at the start of training (same examples every time, so the curve over training is not
    confounded by batch-to-batch sampling). Drawing the probe set does not change the training data order or RNG.

    **What the LightningModule needs:** nothing beyond Lightning's own ``training_step`` (returning the loss or
    ``{"loss": loss}``) and automatic optimization, with batches of any structure. The per-example gradients are
    gradients of ``training_step``'s loss on single examples, run through :class:`lightning_sgd.module_loss.ModuleLoss`
    (logging muted, RNG forked, buffers and modes restored, ``.grad`` untouched: training is unchanged). The loss
    must be a mean over the examples (checked once, at the first measurement; ``ValueError`` otherwise). Manual
    optimization is refused at setup (``ValueError``): its ``training_step`` steps the optimizers itself and cannot
    be re-run. A module that also implements ``split_batch``/``forward``/``loss`` is measured through those instead
    (and may then use manual optimization).

    Per-example gradient norms come from one forward and backward of the n examples with layer hooks
    (:func:`lightning_sgd.per_example_hooks.hook_gradient_stats`: closed forms for Linear, every convolution and
    transposed convolution, Embedding and the normalization layers, any other module through its own vjp per
    example; checked once against vmap on a few examples) or, for BatchNorm in train mode, or ``engine="vmap"``, from
    :func:`lightning_sgd.per_example.per_example_gradient_stats` (``vmap(grad)``, ``chunk_size`` examples at a
    time, or one example at a time where ``vmap`` cannot run the model). **BatchNorm** layers run in eval mode
    (running statistics) for the measurement, because per-example gradients in train mode are ill-defined; their
    mode is restored afterwards. Dropout stays active with independent masks per example.

    Under DDP each rank measures its own examples; rank 0 logs its value.

    Args:
        schedule: when to measure (``int`` n = every n steps, or a :class:`lightning_sgd.schedules.Schedule`).
        probe_size: ``None`` to use the current batch, or the size (>= 2) of a fixed probe set.
        delta: δ ∈ (0, 1] in the bound B ≤ δ·n·Δ + 1.
        per_layer: also Δ per layer (the module owning the parameters), logged as ``diversity/layer/<name>``.
        chunk_size: examples per ``vmap`` chunk (peak memory ≈ chunk_size × #params).
        engine: ``"auto"`` (layer hooks when every layer is supported, there is no BatchNorm and the one-time
            check against vmap passes; else vmap), ``"hooks"`` or ``"vmap"``.

    Logs ``diversity/value`` (Δ), ``diversity/n_delta`` (n·Δ, ≈ 1 + B_simple when Δ ≪ 1),
    ``diversity/batch_bound`` (δ·n·Δ + 1) and ``diversity/skipped``. The last value is the attribute ``diversity``.
    A measurement whose Δ is undefined (n < 2, all-zero gradients, non-finite gradients) is skipped and counted in
    ``skipped`` (by reason), never logged as a number. If the hooks fail on this model it warns once and uses
    ``vmap``; if that fails too it warns once and stops measuring (``skipped["failed"]``), never crashing the run.
    """

    def __init__(
        self,
        schedule: int | Schedule = 50,
        probe_size: int | None = None,
        delta: float = 1.0,
        per_layer: bool = False,
        chunk_size: int | None = 64,
        engine: str = "auto",
    ) -> None:
        self.probe_size = check_int(_WHO, "probe_size", probe_size, minimum=2, optional=True,
                                    hint="(Δ compares examples: a probe set needs >= 2.)")
        self.delta = check_float(_WHO, "delta", delta, low=0.0, high=1.0, low_open=True)
        self.chunk_size = check_int(_WHO, "chunk_size", chunk_size, minimum=1, optional=True)
        self.engine = check_choice(_WHO, "engine", engine, ("auto", "hooks", "vmap"))
        self.per_layer = check_bool(_WHO, "per_layer", per_layer)
        self.schedule = as_schedule(schedule, _WHO, "schedule")
        self._use_hooks: bool | None = None  # engine = hooks? Decided once per module (with its ModuleLoss)
        self.diversity = math.nan
        self.layer_diversity: dict[str, float] = {}
        self.measured = 0
        self.skipped = {"too_few": 0, "zero_gradient": 0, "nonfinite": 0, "failed": 0}
        self.last_metrics: dict[str, float] = {}
        self.probe: Any = None
        self._last_step: int | None = None
        self._loss: ModuleLoss | None = None  # the module's loss, rebuilt for another module
        self._off = False  # every engine failed on this model: no more measurements in this run

    @property
    def engine_in_use(self) -> str | None:
        """``"hooks"`` or ``"vmap"``: the engine of the last measurement (after any fallback); ``None`` before the
        first one or after every engine failed."""
        if self._off or self._use_hooks is None:
            return None
        return "hooks" if self._use_hooks else "vmap"

    # ------------------------------------------------------------------------------------------------- probe set
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loss = ModuleLoss(pl_module, _WHO)
            self._loss.check_usable()  # every measurement re-runs the module's loss
            self._use_hooks, self._off = None, False
            per_example_engine(pl_module, self.engine, _WHO)  # engine='hooks' on a model they cannot serve: raise

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_size is not None and self.probe is None:
            self.probe = self._draw_probe(trainer, pl_module)
        elif self.probe is not None:  # restored from a checkpoint (on CPU)
            self.probe = trainer.strategy.batch_to_device(self.probe)

    def _draw_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The first ``probe_size`` examples the training loader yields, without moving its RNG or the global one."""
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("GradientDiversity(probe_size=...) needs a training dataloader to draw the probe set.")
        generators = [g for g in (getattr(loader, "generator", None),
                                  getattr(getattr(loader, "sampler", None), "generator", None)) if g is not None]
        states = [g.get_state() for g in generators]
        batches, count = [], 0
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                batches.append(batch)
                count += batch_size(batch, _WHO)
                if count >= self.probe_size:
                    break
        for g, state in zip(generators, states):
            g.set_state(state)
        if count < self.probe_size:  # before the first step: a probe set smaller than asked would be a silent change
            where = " on this rank" if trainer.world_size > 1 else ""
            raise ValueError(f"GradientDiversity: probe_size={self.probe_size} is larger than the training data: the "
                             f"training loader yields only {count} example(s){where}. Use probe_size <= {count}, or "
                             "probe_size=None to measure on each training batch.")
        # the tensors with the example dimension concatenated, everything else (broadcast tensors, strings) as in the
        # first batch, in the batch's own structure
        flat = [flatten_batch(b, _WHO) for b in batches]
        columns = zip(*(tensors for tensors, _, _ in flat))
        probe = flat[0][1]([torch.cat(column)[: self.probe_size] for column in columns])
        return trainer.strategy.batch_to_device(probe)

    # ----------------------------------------------------------------------------------------------- measuring
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or not self.schedule(step):
            return  # with gradient accumulation, measure once per optimizer step
        self._last_step = step
        metrics = self.measure(pl_module, self.probe if self.probe is not None else batch)
        if metrics:
            self.last_metrics = metrics
            log_metrics(trainer, metrics, step)

    def measure(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, float]:
        """Compute Δ on ``batch`` now; update ``diversity`` and return the metrics (only ``skipped`` if undefined)."""
        if self._off:
            return self._skip("failed")
        n = batch_size(batch, _WHO)
        if n < 2:
            return self._skip("too_few")
        if self._loss is None or self._loss.module is not pl_module:
            self._loss, self._use_hooks = ModuleLoss(pl_module, _WHO), None
        loss = self._loss
        if self._use_hooks is None:
            self._use_hooks = self._hooks_apply(pl_module, batch)
        stats = self._stats(pl_module, batch)
        if stats is None:
            return self._skip("failed")
        if not bool(torch.isfinite(stats.sq_norms).all()) or not all(bool(torch.isfinite(g).all())
                                                                     for g in stats.mean_grad):
            return self._skip("nonfinite")
        loss.check_mean(batch)  # once: Δ of a loss that is not a mean over examples is not the examples' Δ
        value, layers = diversity_from_stats(stats, list(trainable_parameters(pl_module)))
        if not math.isfinite(value):
            return self._skip("zero_gradient")
        self.diversity, self.layer_diversity = value, layers
        self.measured += 1
        metrics = {
            "diversity/value": value,
            "diversity/n_delta": n * value,
            "diversity/batch_bound": batch_size_bound(value, n, self.delta),
            "diversity/n": float(n),
        }
        metrics.update({f"diversity/layer/{k}": v for k, v in layers.items() if math.isfinite(v)})
        return metrics

    def _stats(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Per-example statistics of ``batch`` from the engine in use; on a failure, one warning and the next engine
        (hooks -> vmap -> none for the rest of the run, returning ``None``)."""
        loss = self._loss
        assert loss is not None
        if self._use_hooks:
            try:  # the engines run the module's code isolated (ModuleLoss.isolated)
                return hook_gradient_stats(pl_module, batch, loss=loss, per_layer=self.per_layer)
            except Exception as err:  # noqa: BLE001 - fall back to vmap
                self._use_hooks = False
                rank_zero_warn(f"GradientDiversity: layer hooks failed on this model ({type(err).__name__}: {err}); "
                               "measuring through vmap from now on. Pass engine='vmap' to skip the hooks.")
        try:
            return per_example_gradient_stats(pl_module, batch, loss=loss, chunk_size=self.chunk_size,
                                              per_layer=self.per_layer)
        except Exception as err:  # noqa: BLE001 - never a crash mid-run: stop measuring instead
            self._off = True
            rank_zero_warn(f"GradientDiversity: per-example gradients cannot be computed for this model "
                           f"({type(err).__name__}: {err}); no more measurements in this run (counted in "
                           "skipped['failed']).")
            return None

    def _hooks_apply(self, pl_module: pl.LightningModule, batch: Any) -> bool:
        """Whether the layer-hook engine serves this module: supported layers, no BatchNorm, and per-example norms
        equal to vmap's on a few examples of ``batch`` (a one-time check)."""
        if per_example_engine(pl_module, self.engine, _WHO)[0] != "hooks":
            return False
        loss = self._loss
        assert loss is not None
        try:
            problem = validate(pl_module, batch, loss=loss)
        except Exception as err:  # noqa: BLE001 - the cross-check cannot run this model: do not trust the hooks
            problem = f"the cross-check against vmap failed: {type(err).__name__}: {err}"
        if problem is not None:
            rank_zero_warn(f"GradientDiversity: layer hooks cannot be trusted for this model ({problem}); "
                           "measuring through vmap. Pass engine='vmap' to skip the check.")
        return problem is None

    def _skip(self, reason: str) -> dict[str, float]:
        self.skipped[reason] += 1
        return {"diversity/skipped": float(sum(self.skipped.values()))}

    # --------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        probe = None if self.probe is None else tree_map(
            lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, self.probe)
        return {"diversity": self.diversity, "layer_diversity": dict(self.layer_diversity), "measured": self.measured,
                "skipped": dict(self.skipped), "probe": probe, "probe_size": self.probe_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last value, the counters and the probe set. ``"diversity"`` and ``"measured"`` are required;
        a state from a version without the others gets: no per-layer values, no skips, and ``probe_size`` read off
        the saved probe set (``None`` without one).

        A ``probe_size`` other than the checkpoint's is honoured, with a warning: a new probe set of the new size is
        drawn when training resumes (or, for ``None``, the training batch is used). Keeping the old probe set would
        silently ignore the argument, and refusing would block a deliberate change; but Δ scales roughly as 1/n, so
        values before and after are not comparable (n·Δ, ``diversity/n_delta``, is).
        """
        missing_state_keys(_WHO, state_dict, ["diversity", "measured"], self.state_key)
        self.diversity = float(state_dict["diversity"])
        self.layer_diversity = dict(state_dict.get("layer_diversity", {}))
        self.measured = int(state_dict["measured"])
        self.skipped = {**self.skipped, **state_dict.get("skipped", {})}
        probe = state_dict.get("probe")
        saved_size = state_dict.get("probe_size", None if probe is None else batch_size(probe, _WHO))
        if saved_size == self.probe_size:
            self.probe = probe  # a resumed run keeps measuring on the same probe examples
            return
        self.probe = None
        was = "the training batch" if saved_size is None else f"a probe set of {saved_size} examples"
        now = ("the training batch" if self.probe_size is None
               else f"a new probe set of {self.probe_size} examples, drawn when training resumes")
        rank_zero_warn(f"GradientDiversity: the checkpoint measured Δ on {was} (probe_size={saved_size}); this "
                       f"callback has probe_size={self.probe_size}, so it measures on {now}. Δ scales roughly as "
                       "1/n: values before and after the resume are not comparable (diversity/n_delta = n·Δ is).")
