"""GradientNoiseScale: B_simple, B_noise and the critical batch size, measured during training.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training". The maths lives in
:mod:`lightning_sgd.noise_scale` (pure functions) and the per-example engines (:mod:`lightning_sgd.per_example`,
:mod:`lightning_sgd.per_example_hooks`, shared with GradientDiversity); the module's loss comes from its own
``training_step`` through :class:`lightning_sgd.module_loss.ModuleLoss`. This file only decides where the two batch
sizes come from.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_sgd.batches import batch_size, slice_batch
from lightning_sgd.checks import check_bool, check_choice, check_float, check_int, missing_state_keys
from lightning_sgd.compat import Callback
from lightning_sgd.module_loss import ModuleLoss, measuring, twice_differentiable_attention
from lightning_sgd.noise_scale import (
    NoiseScaleEMA,
    NoiseScaleSample,
    per_example_estimate,
    regime,
    two_batch_estimate,
)
from lightning_sgd.per_example import batchnorm_eval, layer_of, per_example_gradient_stats, trainable_parameters
from lightning_sgd.per_example_hooks import PerExampleNormHooks, unsupported_layers, validate
from lightning_sgd.schedules import Schedule, as_schedule

__all__ = ["GradientNoiseScale"]

_SOURCES = ("auto", "ddp", "accumulation", "per_example", "split")
_ENGINES = ("auto", "hooks", "vmap")
#: The per-example hook engine checks that the per-example bias gradients add up to .grad on the first
#: _BIAS_CHECK_FIRST measurements and every _BIAS_CHECK_EVERY-th after (a loss term outside the layers is a property
#: of the run, and the check costs ~0.25 ms per measurement on a 3 ms CPU step).
_BIAS_CHECK_FIRST, _BIAS_CHECK_EVERY = 5, 25
_HOOK_SOURCES = ("ddp", "accumulation")
_WHO = "GradientNoiseScale"
#: Default schedule when none is given: the hook sources cost almost nothing, the compute sources re-run the batch.
_DEFAULT_INTERVAL = {"ddp": 1, "accumulation": 1, "per_example": 50, "split": 50}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _num_examples(batch: Any) -> int:
    return batch_size(batch, _WHO)


class GradientNoiseScale(Callback):
    r"""Measure the gradient noise scale B_simple = tr Σ / |G|² (and optionally B_noise) during training.

    Every measurement takes squared norms of gradients of the **same step** (same parameters) at two batch sizes,
    turns them into unbiased samples of |G|² and tr Σ (:mod:`lightning_sgd.noise_scale`), and feeds two separate
    bias-corrected EMAs; B_simple is the ratio of the EMAs. Norms are measured in ``on_before_optimizer_step``, which
    Lightning 2.x calls after AMP unscaling and before gradient clipping.

    **What the LightningModule needs:** nothing beyond Lightning's own ``training_step`` (returning the loss, or
    ``{"loss": loss}``) and automatic optimization, with batches of any structure (tensors, tuples, dicts, ...).
    The loss must be a **mean over the examples** of the batch (the estimators compare gradients of batches of
    different sizes); the sources that re-run the module's code check this once, at their first measurement, and
    raise a ``ValueError`` for a sum. Whenever a source needs the loss of a batch or part of it, it calls
    ``training_step`` through :class:`lightning_sgd.module_loss.ModuleLoss` (logging muted, RNG forked, buffers and
    modes restored, ``.grad`` untouched), so a measurement never changes the training trajectory or what
    ``training_step`` logs. A module that also implements ``split_batch``/``forward``/``loss`` is measured through
    those instead (a shortcut past whatever else its ``training_step`` computes).

    Skips and fallbacks, never a crash mid-run: steps with non-finite gradients are skipped and counted
    (``skipped["nonfinite"]``), a batch of one example on the per_example/split source (an epoch's last batch
    without ``drop_last``) in ``skipped["too_few"]``. If the per_example source fails on this model (an op neither
    engine can run per example, an error in the module's code on a single example), the run warns once and
    switches to ``"split"``, which needs only forward/backward of slices of the batch; if that fails too it warns
    and stops measuring for the rest of the run (``skipped["failed"]`` counts the measurements not taken). The same
    holds for the B_noise estimate on its own.

    Sources of the two batch sizes (``source``):

    - ``"ddp"``: each rank's local gradient (small) vs the all-reduced gradient (big). If the strategy publishes
      ``latest_grad_stats`` (:class:`lightning_sgd.plugins.GradStatsDDPStrategy`) its record for the current step is
      used (small batch = one rank's whole step). Otherwise every micro-batch on every rank is one small batch: its
      gradient is the difference of ``.grad`` before and after its backward (three ``torch._foreach`` passes),
      taken for the synced backward in an autograd-engine callback that runs before DDP overwrites ``.grad`` with
      the average; that callback also launches the one all-reduce of a few scalars per measured step, which then
      overlaps DDP's last bucket. With ``gradient_as_bucket_view=True`` (``.grad`` is DDP's bucket, reduced in
      place) a tensor hook per parameter reads the local gradients instead.
    - ``"accumulation"`` (``accumulate_grad_batches > 1``): each micro-batch's gradient (the same ``.grad``
      differences) vs their mean: zero extra FLOPs.
    - ``"per_example"``: per-example gradient norms of the training step's own backward pass, read by layer hooks
      from each layer's input and output gradient (:mod:`lightning_sgd.per_example_hooks`: Linear, Conv1d/2d/3d,
      Embedding, LayerNorm, GroupNorm), so a measured step costs the training step plus a few small matmuls per
      layer; or, with ``engine="vmap"`` or any other layer type, from the shared ``vmap(grad)`` engine
      (:func:`lightning_sgd.per_example.per_example_gradient_stats`, in chunks of ``chunk_size``), which re-runs
      the batch.
    - ``"split"``: the batch split into ``split_parts`` equal parts (remainder dropped), one extra forward/backward
      of the module's loss per part. BatchNorm buffers and the RNG are restored afterwards, so training is
      unaffected.
    - ``"auto"`` (default): ``"ddp"`` with more than one process, else ``"accumulation"`` when accumulating, else
      ``"per_example"``, except for models with BatchNorm, whose per-example gradients in train mode are
      ill-defined: those fall back to ``"split"`` (each part normalized by its own statistics, like ghost batch
      norm). Why per-example over split on one device: per-example uses b = 1, the largest possible gap between
      the two batch sizes: its tr Σ sample is a sample variance with B − 1 degrees of freedom instead of
      k − 1 = 3, i.e. roughly (B − 1)/(k − 1) ≈ 30× lower variance; and with the hook engine it is also the
      cheaper one (no second pass; benchmarks/gns_overhead.py). Even through ``vmap`` it costs only ~1.3× a
      4-part split.

    Args:
        schedule: when to measure (``int`` n = every n steps, or a :class:`lightning_sgd.schedules.Schedule`).
            ``None``: every step for the hook sources (nearly free), every 50 steps for per_example/split (a
            measured step costs them ~2-3× a training step on CPU, so every 50 keeps the average under 1.05×).
        source: ``"auto"``, ``"ddp"``, ``"accumulation"``, ``"per_example"`` or ``"split"`` (see above).
        split_parts: parts for the ``"split"`` source (>= 2).
        chunk_size: examples per ``vmap`` chunk for the ``"per_example"`` source (memory ≈ chunk × #params).
        engine: how the ``"per_example"`` source gets per-example norms: ``"hooks"`` (layer hooks on the training
            backward; ``ValueError`` at setup if a layer is unsupported), ``"vmap"`` (re-run the batch with
            ``vmap(grad)``), or ``"auto"`` (hooks when every layer with trainable parameters is supported, there is
            one process and no accumulation; else vmap). The hook engine checks itself
            against vmap on a few examples at its first measurement, checks at every measurement that layers ran
            once, and on the first 5 measurements and every 25th that the per-example bias gradients add up to
            ``.grad``; on any mismatch (tied weights, a parameter used outside its layer, a loss that is not a mean
            over examples) it warns and switches to vmap for the rest of the run.
        beta: EMA decay per measurement.
        per_layer: also estimate B_simple per layer (the module owning the parameters); logged under
            ``gns/layer/<name>/...``. Not available when the numbers come from a strategy's record.
        b_noise_schedule: when to also estimate B_noise = tr(HΣ)/(GᵀHG) with Hessian-vector products; ``None``
            disables it. Uses the current batch: the first half gives ``b_noise_groups`` group gradients, the second
            half the Hessian, so H is independent of the gradients and the two-batch-size estimator stays unbiased.
            Costs ``b_noise_groups`` gradients and ``b_noise_groups + 1`` Hessian-vector products (double backward
            through the module's loss) per estimate. BatchNorm runs in eval mode for it.
        b_noise_groups: group gradients for the B_noise estimate (>= 2).

    Logs (every logger, at the measured step): ``gns/grad_sq_norm`` (|G|²), ``gns/trace_cov`` (tr Σ),
    ``gns/b_simple``, ``gns/b_noise`` (when enabled), ``gns/batch_size`` (the training batch, all devices and
    micro-batches) and ``gns/regime`` = log2(batch_size / B_simple): below 0 the run is noise-dominated (a larger
    batch still cuts steps almost linearly), above 0 curvature-dominated (diminishing returns). The current
    smoothed values are the attributes ``b_simple``, ``grad_sq_norm``, ``trace_cov``, ``b_noise``.

    Raises:
        ValueError: at setup, on a source that cannot work for this run (e.g. ``"ddp"`` on one process,
            ``"accumulation"`` without accumulation: B_small == B_big), ``"per_example"`` with BatchNorm, or manual
            optimization (``automatic_optimization=False``: the hook sources read gradients as Lightning's automatic
            optimization accumulates them, and the other sources would re-run a ``training_step`` that steps the
            optimizers itself; a module with ``split_batch``/``forward``/``loss`` can still use ``"per_example"``
            or ``"split"``, which ``"auto"`` then picks); at the first measurement, a loss that is not a mean over
            examples.
    """

    def __init__(
        self,
        schedule: int | Schedule | None = None,
        source: str = "auto",
        split_parts: int = 4,
        chunk_size: int | None = 64,
        beta: float = 0.95,
        per_layer: bool = False,
        b_noise_schedule: int | Schedule | None = None,
        b_noise_groups: int = 4,
        engine: str = "auto",
    ) -> None:
        self.source = check_choice(_WHO, "source", source, _SOURCES)
        self.engine = check_choice(_WHO, "engine", engine, _ENGINES)
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
        self.b_noise_ema = NoiseScaleEMA(self.beta)
        self.measured = 0
        self.skipped = {"nonfinite": 0, "stale": 0, "too_few": 0, "failed": 0}
        self.last_sample: NoiseScaleSample | None = None
        self.last_metrics: dict[str, float] = {}
        # per-run state (setup)
        self._source: str | None = None  # the source in use (after "auto" and any fallback)
        self._loss: ModuleLoss | None = None  # the module's loss, for the sources that re-run its code
        self._off = False  # the measurements failed beyond any fallback: stop measuring for this run
        self._b_noise_off = False  # the B_noise estimate failed: stop it for this run
        self._warned_b_noise_batch = False  # warned once that a batch is too small to split for B_noise
        self._schedule: Schedule | None = None
        self._use_record = False
        self._handles: list[Any] = []
        self._layers: list[str] = []
        # this micro-batch's (parameter indices, |grad_p|) from the tensor hooks, in the order the hooks fired
        self._acc: tuple[list[int], list[Tensor]] | None = None
        # per micro-batch: (indices of the parameters with a gradient, or None for all of them; their norms), from
        # the tensor hooks or the .grad differences (see _difference_norms); reduced once per step by _micro_matrix
        self._micro: list[tuple[list[int] | None, list[Tensor]]] = []
        self._param_list: list[Tensor] = []
        # hook sources without the strategy's record: micro-batch gradients as differences of .grad (on one process,
        # and under DDP unless .grad is a view of DDP's buckets); else a tensor hook per parameter
        self._differencing = False
        self._engine_diff = False  # this synced DDP backward is differenced in an engine callback (before finalize)
        self._stats_work: tuple[Any, Tensor] | None = None  # (async all-reduce, its buffer) of this step's scalars
        self._prev: list[Tensor] = []  # .grad after the previous micro-batch (one buffer per parameter)
        self._prev_valid: set[int] = set()  # parameters whose buffer holds this step's previous .grad
        self._armed_diff = False
        self._assign = torch.zeros(0, 1, dtype=torch.float64)
        self._micro_sizes: list[int] = []
        self._step_examples = 0
        self._batch: Any = None
        self._batch_step = -1
        self._last_step = -1
        self._hooks: PerExampleNormHooks | None = None  # the per-example hook engine, when it is in use
        self._hooks_validated = False

    # ------------------------------------------------------------------------------------------- public values
    @property
    def b_simple(self) -> float:
        """Smoothed B_simple = EMA(tr Σ) / EMA(|G|²); NaN before the first measurement."""
        return self.ema.b_simple

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed unbiased |G|²."""
        return self.ema.grad_sq_norm

    @property
    def trace_cov(self) -> float:
        """Smoothed unbiased tr Σ."""
        return self.ema.trace_cov

    @property
    def b_noise(self) -> float:
        """Smoothed B_noise = EMA(tr HΣ) / EMA(GᵀHG); NaN unless ``b_noise_schedule`` is set and has run."""
        return self.b_noise_ema.b_simple

    @property
    def source_in_use(self) -> str | None:
        """The source this run measures with: ``source`` after ``"auto"`` and any fallback (``None`` before setup
        or after the measurements were given up)."""
        return None if self._off else self._source

    @property
    def engine_in_use(self) -> str | None:
        """For the per_example source, ``"hooks"`` or ``"vmap"`` (after any fallback); else ``None``."""
        if self.source_in_use != "per_example":
            return None
        return "hooks" if self._hooks is not None else "vmap"

    # ---------------------------------------------------------------------------------------------------- setup
    def _resolve_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        manual = not pl_module.automatic_optimization
        source = self.source
        if source == "auto":
            if manual:  # no gradients accumulated by Lightning to read: a source that computes its own
                source = "split" if _has_batchnorm(pl_module) else "per_example"
            elif world > 1:
                source = "ddp"
            elif accumulate > 1:
                source = "accumulation"
            else:
                source = "split" if _has_batchnorm(pl_module) else "per_example"
        if source == "ddp" and world < 2:
            raise ValueError("GradientNoiseScale(source='ddp') needs more than one process (B_small == B_big on one "
                             "device); use source='auto'.")
        if source == "accumulation" and accumulate < 2:
            raise ValueError("GradientNoiseScale(source='accumulation') needs Trainer(accumulate_grad_batches >= 2): "
                             "with one micro-batch B_small == B_big. Use source='auto'.")
        if source in _HOOK_SOURCES and manual:
            raise ValueError(
                f"GradientNoiseScale(source={source!r}) reads gradients as Lightning's automatic optimization "
                f"accumulates them, but {type(pl_module).__name__} uses manual optimization "
                "(automatic_optimization=False); remove the callback, or implement split_batch/forward/loss and use "
                "source='per_example' or 'split'.")
        if source == "per_example" and _has_batchnorm(pl_module):
            raise ValueError(
                "GradientNoiseScale(source='per_example'): the model has BatchNorm, whose per-example gradients in "
                "train mode are ill-defined (each example's loss depends on the whole batch). Use source='split' "
                "(or 'auto', which picks it), or replace BatchNorm by GroupNorm/LayerNorm."
            )
        if source in ("per_example", "split") or self.b_noise_schedule is not None:
            # these re-run the module's code, which must not be a training_step that steps the optimizers itself
            self._loss_of(pl_module).check_usable()
        return source

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._loss = ModuleLoss(pl_module, _WHO)
        self._off = self._b_noise_off = self._warned_b_noise_batch = False
        self._source = self._resolve_source(trainer, pl_module)
        self._schedule = self.schedule or as_schedule(_DEFAULT_INTERVAL[self._source])
        params = trainable_parameters(pl_module)
        self._param_list = list(params.values())  # trainable parameters in module order (shared ones once)
        self._layers = list(dict.fromkeys(layer_of(name) for name in params))
        layer_index = {layer: i for i, layer in enumerate(self._layers)}
        slots = [1 + layer_index[layer_of(name)] for name in params]  # per parameter: its per-layer slot
        # (#params, 1 + L) 0/1 matrix: squared norms per parameter @ it = (total, per layer...) in one matmul
        self._assign = torch.zeros(len(params), 1 + len(self._layers) if self.per_layer else 1, dtype=torch.float64)
        self._assign[:, 0] = 1.0
        if self.per_layer:
            self._assign[torch.arange(len(params)), torch.tensor(slots, dtype=torch.long)] = 1.0
        self._use_record = self._source == "ddp" and hasattr(trainer.strategy, "latest_grad_stats")
        if self._use_record and self.per_layer:
            rank_zero_warn("GradientNoiseScale: per_layer is not available from the strategy's grad-stats record; "
                           "only the total is measured.")
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None) or {}
        self._differencing = (self._source in _HOOK_SOURCES and not self._use_record
                              and (trainer.world_size == 1 or not ddp_kwargs.get("gradient_as_bucket_view", False)))
        self._prev, self._prev_valid = [], set()
        if self._source in _HOOK_SOURCES and not self._use_record and not self._differencing:
            self._register_hooks(params)
        self._hooks, self._hooks_validated = None, False
        if self._source == "per_example" and self.engine != "vmap":
            self._setup_hook_engine(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.b_noise_schedule is not None:  # the loader's batch size is known now, before the first step
            self._check_b_noise_batch(getattr(trainer.train_dataloader, "batch_size", None))

    def _check_b_noise_batch(self, n: int | None) -> bool:
        """Can a batch of ``n`` examples be split for B_noise (half into ``b_noise_groups`` groups of >= 1 example,
        half for the Hessian)? If not, warn once, naming ``b_noise_groups``."""
        if not isinstance(n, int) or n >= 2 * self.b_noise_groups:
            return True
        if not self._warned_b_noise_batch:
            self._warned_b_noise_batch = True
            rank_zero_warn(
                f"GradientNoiseScale: a batch of {n} example(s) is too small for the B_noise estimate with "
                f"b_noise_groups={self.b_noise_groups}: it needs >= 2 * b_noise_groups = {2 * self.b_noise_groups} "
                "examples (half split into the groups, half for the Hessian). Those estimates are skipped (counted in "
                "skipped['too_few']); lower b_noise_groups or raise the batch size.")
        return False

    def _setup_hook_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reasons = unsupported_layers(pl_module)
        if trainer.world_size > 1:
            reasons.append("more than one process (.grad is the all-reduced gradient)")
        if trainer.accumulate_grad_batches > 1:
            reasons.append("gradient accumulation (.grad spans several backward passes)")
        if not pl_module.automatic_optimization:
            reasons.append("manual optimization")
        if not reasons:
            # only the training step's own forward: other callbacks' extra passes (diversity probes, curvature
            # products) run between arm (on_train_batch_start) and collect, under their own hook names or inside a
            # measurement (ModuleLoss.isolated) that re-runs training_step
            self._hooks = PerExampleNormHooks(
                pl_module, layer_names=self.per_layer,
                capture_if=lambda: pl_module._current_fx_name == "training_step" and not measuring())
        elif self.engine == "hooks":
            raise ValueError("GradientNoiseScale(engine='hooks') cannot read per-example norms from layer hooks "
                             f"here: {'; '.join(reasons)}. Use engine='vmap' (or 'auto', which picks it).")
        else:
            rank_zero_info(f"GradientNoiseScale: per-example norms through vmap (a second pass per measured step), "
                           f"since the layer-hook engine does not apply: {'; '.join(reasons)}.")

    def _register_hooks(self, params: dict[str, Tensor]) -> None:
        """A tensor hook on each parameter sees that parameter's gradient of the current backward pass (one
        micro-batch, this rank only) before it is accumulated into ``.grad`` and before DDP averages it."""
        self._remove_hooks()
        for i, param in enumerate(params.values()):
            self._handles.append(param.register_hook(self._make_hook(i)))

    def _make_hook(self, index: int):
        def hook(grad: Tensor) -> None:
            if self._acc is not None:  # one small kernel per parameter; squares and sums once per micro-batch
                self._acc[0].append(index)
                self._acc[1].append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
            return None

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._prev, self._prev_valid, self._armed_diff = [], set(), False
        self._engine_diff, self._stats_work = False, None
        if self._hooks is not None:
            self._hooks.disarm()
        self._acc, self._batch = None, None

    # --------------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._batch_step:  # first micro-batch of this optimizer step
            self._batch_step = step
            self._micro, self._micro_sizes, self._step_examples = [], [], 0
        n = _num_examples(batch)
        self._step_examples += n
        due = self._schedule(step)
        b_noise = self.b_noise_schedule is not None and self.b_noise_schedule(step)
        if self._source in _HOOK_SOURCES and not self._use_record and due:
            if self._differencing:
                self._armed_diff = True
            else:
                self._acc = ([], [])
            self._micro_sizes.append(n)
        self._batch = batch if (due and self._source in ("per_example", "split")) or b_noise else None
        if self._hooks is not None and due and n >= 2:
            self._hooks.arm(n)  # n: inputs broadcast over the batch (shape[0] != n) are told apart

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Under DDP, a synced backward ends with DDP's finalize callback overwriting .grad with the average. An
        # autograd-engine callback queued when the backward starts (from a hook on the loss) runs before it, since
        # DDP queues its own only when its last bucket is ready: there .grad is still this rank's.
        if not (self._armed_diff and trainer.world_size > 1 and loss.requires_grad):
            return
        model = trainer.strategy.model
        if getattr(model, "require_backward_grad_sync", True):  # not a no_sync micro-batch
            self._engine_diff = True
            loss.register_hook(self._queue_engine_diff)

    def _queue_engine_diff(self, grad: Tensor) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._engine_diff_callback)

    def _engine_diff_callback(self) -> None:
        """End of a synced DDP backward, before DDP's finalize: difference this rank's .grad and launch the one
        all-reduce of this step's scalars, which then overlaps DDP's wait for its last bucket."""
        self._micro.append(self._difference_norms(first=len(self._micro) == 0, last=True))
        device = self._param_list[0].device  # NCCL reduces device tensors only
        stats = self._local_stats().to(device)
        self._stats_work = (torch.distributed.all_reduce(stats, async_op=True), stats)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._acc is not None:  # no tensor work here: everything is reduced once per optimizer step
            self._micro.append(self._acc)
            self._acc = None
        if self._armed_diff:
            self._armed_diff = False
            if self._engine_diff:  # done by the engine callback
                self._engine_diff = False
            else:
                first = len(self._micro) == 0
                last = len(self._micro_sizes) >= trainer.accumulate_grad_batches  # the step's last micro-batch
                self._micro.append(self._difference_norms(first, last))

    def _local_stats(self) -> Tensor:
        """(1 + L + 2,) float64: Σ_k |g_k|² (total, per layer) over this rank's micro-batches, Σ_k 1/b_k, W_local."""
        micro = self._micro_matrix()
        extra = torch.tensor([sum(1.0 / b for b in self._micro_sizes), float(len(self._micro))], dtype=torch.float64)
        return torch.cat([micro.sum(0), extra])

    def _difference_norms(self, first: bool, last: bool) -> tuple[list[int] | None, list[Tensor]]:
        """This micro-batch's per-parameter gradient norms: .grad now minus .grad after the previous micro-batch.

        ``torch._foreach_*`` passes over the gradients (norm + copy on the first micro-batch, subtract + norm + copy
        after; no copy on the last), one C++ call each instead of a Python hook per parameter. Memory: one copy of
        the gradients, allocated once. Returns (indices of the parameters with a .grad, or ``None`` for all of them;
        their norms as 0-dim tensors), reduced once per step by :meth:`_micro_matrix`.
        """
        params = self._param_list
        if not self._prev:
            self._prev = [torch.zeros_like(p) for p in params]
        if first:
            self._prev_valid = set()
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            present, prev = None, self._prev
            indices = range(len(params))
        else:
            indices = [i for i, g in enumerate(grads) if g is not None]
            present, grads, prev = indices, [grads[i] for i in indices], [self._prev[i] for i in indices]
            if not indices:  # no gradient at all in this backward
                return present, []
        if first:  # .grad is this micro-batch's gradient
            norms = list(torch._foreach_norm(grads))
        else:
            stale = [prev[j] for j, i in enumerate(indices) if i not in self._prev_valid]
            if stale:  # parameters without .grad after the previous micro-batches: their previous sum is 0
                torch._foreach_zero_(stale)
            torch._foreach_sub_(prev, grads)  # prev = S_{k-1} - S_k = -g_k
            norms = list(torch._foreach_norm(prev))
        if not last:
            torch._foreach_copy_(prev, grads)
            self._prev_valid.update(indices)
        return present, norms

    def _micro_matrix(self) -> Tensor:
        """(W, 1 + L) float64 squared norms of this rank's micro-batches (total, then per layer)."""
        if all(indices is None for indices, _ in self._micro):  # every parameter had a .grad, in parameter order
            norms = torch.stack([n for _, micro in self._micro for n in micro]).reshape(len(self._micro), -1)
            return norms.double().square().cpu() @ self._assign
        return torch.stack([self._layer_sums(indices, norms) for indices, norms in self._micro])

    def _layer_sums(self, indices: list[int] | None, norms: list[Tensor]) -> Tensor:
        """(1 + L,) float64 squared norms (total, then per layer) from per-parameter norms of the parameters at
        ``indices`` (``None``: all of them, in order)."""
        if not norms:
            return torch.zeros(self._assign.shape[1], dtype=torch.float64)
        assign = self._assign if indices is None else self._assign[indices]
        return torch.stack(norms).double().square().cpu() @ assign

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if step == self._last_step:  # several optimizers: measure once per step
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        if self._schedule(step):
            metrics.update(self._measure(trainer, pl_module))
        if self.b_noise_schedule is not None and self.b_noise_schedule(step):
            metrics.update(self._measure_b_noise(pl_module))
        self._micro, self._micro_sizes, self._batch = [], [], None
        if metrics:
            self.last_metrics = metrics
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)

    # ----------------------------------------------------------------------------------------------- measuring
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._off:
            self.skipped["failed"] += 1
            return {}
        if self._source in _HOOK_SOURCES:
            samples = self._record_samples(trainer) if self._use_record else self._hook_samples(trainer, pl_module)
        else:
            samples = self._computed_samples(trainer, pl_module)
        if samples is None:
            return {}
        total = samples.pop("")
        if not (math.isfinite(total.grad_sq_norm) and math.isfinite(total.trace_cov)):
            self.skipped["nonfinite"] += 1
            return {"gns/skipped_nonfinite": float(self.skipped["nonfinite"])}
        if self._source not in _HOOK_SOURCES:  # once per run: these sources' numbers assume a mean loss
            self._loss_of(pl_module).check_mean(self._batch)
        self.ema.update(total)
        self.last_sample = total
        self.measured += 1
        batch_size = float(self._step_examples * trainer.world_size)
        metrics = {
            "gns/grad_sq_norm": self.grad_sq_norm,
            "gns/trace_cov": self.trace_cov,
            "gns/b_simple": self.b_simple,
            "gns/batch_size": batch_size,
            "gns/regime": regime(batch_size, self.b_simple),
        }
        for layer, sample in samples.items():
            if math.isfinite(sample.grad_sq_norm) and math.isfinite(sample.trace_cov):
                ema = self.layer_ema.setdefault(layer, NoiseScaleEMA(self.beta))
                ema.update(sample)
                metrics[f"gns/layer/{layer}/grad_sq_norm"] = ema.grad_sq_norm
                metrics[f"gns/layer/{layer}/trace_cov"] = ema.trace_cov
                metrics[f"gns/layer/{layer}/b_simple"] = ema.b_simple
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    def _grad_sq_norms(self, grads: list[Tensor | None]) -> Tensor:
        """(1 + L,) float64 squared norms of a gradient list in trainable-parameter order (``None``: no gradient):
        total, then per layer when per_layer. One fused norm call and one matmul with the assignment matrix."""
        present = [i for i, g in enumerate(grads) if g is not None]
        tensors = [grads[i].detach() for i in present]
        if any(t.dtype not in (torch.float32, torch.float64) for t in tensors):
            tensors = [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors]
        norms = list(torch._foreach_norm(tensors)) if tensors else []
        return self._layer_sums(None if len(present) == len(grads) else present, norms)

    def _samples(self, small: Tensor | list[float], b_small: float, big: Tensor | list[float],
                 b_big: float) -> dict[str, NoiseScaleSample]:
        """Per entry of the (1 + L,) vectors of mean small-batch and big-batch squared norms."""
        keys = [""] + (self._layers if self.per_layer else [])
        out = {}
        for i, key in enumerate(keys):
            out[key] = two_batch_estimate(float(small[i]), b_small, float(big[i]), b_big)
        return out

    def _record_samples(self, trainer: pl.Trainer) -> dict[str, NoiseScaleSample] | None:
        record = getattr(trainer.strategy, "latest_grad_stats", None)
        if record is None or record.step != trainer.global_step:
            self.skipped["stale"] += 1  # never pair norms from different steps
            if self.skipped["stale"] == 1:
                rank_zero_warn(f"GradientNoiseScale: the strategy's grad-stats record is "
                               f"{'missing' if record is None else f'for step {record.step}'} at step "
                               f"{trainer.global_step}; skipping (counted in skipped['stale']).")
            return None
        small = torch.as_tensor(record.local_sq_norms, dtype=torch.float64).mean().reshape(1)
        big = torch.tensor([float(record.global_sq_norm)], dtype=torch.float64)
        return self._samples(small, record.local_batch_size, big, record.global_batch_size)

    def _hook_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, NoiseScaleSample] | None:
        pending, self._stats_work = self._stats_work, None
        if pending is not None:  # launched by the engine callback at the end of the synced backward
            pending[0].wait()
        if not self._micro or len(self._micro) != len(self._micro_sizes):
            self.skipped["too_few"] += 1
            return None
        # Lightning divides each micro-batch loss by accumulate_grad_batches (A); AMP multiplies it by the scale.
        accumulate = trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        local_w = len(self._micro)
        # .grad = (1/A) Σ_k g_k (averaged over ranks by DDP); the mean of the small-batch gradients is .grad·A/W.
        big = (self._grad_sq_norms([p.grad for p in self._param_list]) * (accumulate / local_w) ** 2).tolist()
        if pending is not None:
            stats = pending[1].double().cpu()
        else:
            stats = self._local_stats()
            if trainer.world_size > 1:
                stats = trainer.strategy.reduce(stats.to(pl_module.device), reduce_op="sum").double().cpu()
        *sums, inv_b, total_w = stats.tolist()
        if total_w < 2:
            self.skipped["too_few"] += 1
            return None
        factor = (accumulate / scale) ** 2 / total_w  # |g_k|² of the micro-batches' mean losses, averaged over k
        # Unequal small batches: E mean_k|g_k|² = |G|² + trΣ/b_eff with b_eff = W / Σ_k 1/b_k, and the mean of the
        # W small gradients has E|.|² = |G|² + trΣ/(W·b_eff).
        b_eff = total_w / inv_b
        return self._samples([v * factor for v in sums], b_eff, big, total_w * b_eff)

    def _hook_engine_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             n: int) -> dict[str, NoiseScaleSample] | None:
        """Samples from the norms the layer hooks read off this step's backward; ``None`` (after switching to vmap
        for good, with a warning) when they cannot be trusted."""
        hooks = self._hooks
        assert hooks is not None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        # the bias-sum check costs ~10 small ops: on the first measurements, then every _BIAS_CHECK_EVERY-th
        checking = self.measured < _BIAS_CHECK_FIRST or self.measured % _BIAS_CHECK_EVERY == 0
        problem = hooks.check_bias_sums(scale) if checking else None
        sq, layer_sq, collect_problem = hooks.collect()
        problem = problem or collect_problem
        if problem is None and sq is not None and sq.numel() != n:
            problem = f"the hooks saw {sq.numel()} examples, the batch has {n}"
        if problem is None and not self._hooks_validated:
            try:  # runs the module's code isolated (ModuleLoss.isolated), in eval mode
                problem = validate(pl_module, self._batch, loss=self._loss_of(pl_module))
            except Exception as err:  # noqa: BLE001 - the cross-check cannot run this model: do not trust the hooks
                problem = f"the cross-check against vmap failed: {type(err).__name__}: {err}"
            self._hooks_validated = problem is None
        if problem is not None:
            rank_zero_warn(f"GradientNoiseScale: per-example norms from layer hooks cannot be trusted for this model "
                           f"({problem}); measuring through vmap from now on. Pass engine='vmap' to skip the hooks.")
            self._hooks = None
            return None
        assert sq is not None
        factor = (n / scale) ** 2  # contributions to the mean loss, AMP-scaled -> per-example gradients
        big = self._grad_sq_norms([p.grad for p in self._param_list])
        out = {"": per_example_estimate(sq * factor, float(big[0]))}
        for i, layer in enumerate(self._layers if self.per_layer else []):
            sq_layer = layer_sq.get(layer)
            sq_layer = torch.zeros_like(sq) if sq_layer is None else sq_layer
            out[layer] = per_example_estimate(sq_layer * factor, float(big[1 + i]))
        return out

    def _loss_of(self, pl_module: pl.LightningModule) -> ModuleLoss:
        if self._loss is None or self._loss.module is not pl_module:
            self._loss = ModuleLoss(pl_module, _WHO)
        return self._loss

    def _computed_samples(self, trainer: pl.Trainer,
                          pl_module: pl.LightningModule) -> dict[str, NoiseScaleSample] | None:
        """The per_example or split source on this step's batch, with their fallbacks: per_example -> split ->
        no measurements, each switch for the rest of the run with one warning."""
        n = _num_examples(self._batch)
        if n < 2:  # e.g. the last batch of an epoch without drop_last
            self.skipped["too_few"] += 1
            return None
        if self._source == "per_example":
            try:
                return self._per_example_samples(trainer, pl_module, n)
            except Exception as err:  # noqa: BLE001 - any failure of the model's code per example: fall back
                if self._hooks is not None:
                    self._hooks.disarm()
                    self._hooks = None
                self._source = "split"
                rank_zero_warn(f"GradientNoiseScale: the per_example source cannot measure this model "
                               f"({type(err).__name__}: {err}); measuring with source='split' from now on "
                               f"({self.split_parts} parts of the batch). Pass source='split' to skip this attempt.")
        try:
            return self._split_samples(pl_module, n)
        except Exception as err:  # noqa: BLE001 - never a crash mid-run: stop measuring instead
            self._off = True
            self.skipped["failed"] += 1
            rank_zero_warn(f"GradientNoiseScale: the split source cannot measure this model either "
                           f"({type(err).__name__}: {err}); no more measurements in this run (counted in "
                           "skipped['failed']).")
            return None

    def _per_example_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             n: int) -> dict[str, NoiseScaleSample]:
        if self._hooks is not None and self._hooks.armed:
            samples = self._hook_engine_samples(trainer, pl_module, n)
            if samples is not None:
                return samples
        stats = per_example_gradient_stats(pl_module, self._batch, loss=self._loss_of(pl_module),
                                           chunk_size=self.chunk_size, per_layer=self.per_layer)
        big = self._grad_sq_norms(stats.mean_grad)
        out = {"": per_example_estimate(stats.sq_norms, float(big[0]))}
        for i, layer in enumerate(self._layers if self.per_layer else []):
            out[layer] = per_example_estimate(stats.layer_sq_norms[layer], float(big[1 + i]))
        return out

    def _split_samples(self, pl_module: pl.LightningModule, n: int) -> dict[str, NoiseScaleSample]:
        """``split_parts`` equal parts of the batch (the remainder dropped), one gradient of the module's loss each;
        buffers, modes, the RNG and what training_step logs are restored by :meth:`ModuleLoss.isolated`."""
        loss = self._loss_of(pl_module)
        parts = min(self.split_parts, n)
        size = n // parts
        tensors = self._param_list
        small = []
        mean = [torch.zeros_like(p) for p in tensors]
        with loss.isolated():
            for k in range(parts):
                part = slice_batch(self._batch, slice(k * size, (k + 1) * size), _WHO)
                grads = torch.autograd.grad(loss.loss(part), tensors, allow_unused=True)
                small.append(self._grad_sq_norms(list(grads)))
                for m, g in zip(mean, grads):
                    if g is not None:
                        m.add_(g, alpha=1.0 / parts)
        big = self._grad_sq_norms(mean)
        return self._samples(torch.stack(small).mean(0), size, big, parts * size)

    def _measure_b_noise(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """B_noise = tr(HΣ)/(GᵀHG): the two-batch-size estimator with the quadratic form of H instead of |·|²."""
        if self._b_noise_off:
            return {}
        n = _num_examples(self._batch)
        if not self._check_b_noise_batch(n):
            self.skipped["too_few"] += 1
            return {}
        size = (n // 2) // self.b_noise_groups
        try:
            sample = self._b_noise_sample(pl_module, n, size)
        except Exception as err:  # noqa: BLE001 - never a crash mid-run: stop this estimate instead
            self._b_noise_off = True
            self.skipped["failed"] += 1
            rank_zero_warn(f"GradientNoiseScale: the B_noise estimate cannot run on this model "
                           f"({type(err).__name__}: {err}); it is off for the rest of the run (B_simple goes on).")
            return {}
        if not (math.isfinite(sample.grad_sq_norm) and math.isfinite(sample.trace_cov)):
            self.skipped["nonfinite"] += 1
            return {}
        self._loss_of(pl_module).check_mean(self._batch)
        self.b_noise_ema.update(sample)
        out = {"gns/b_noise": self.b_noise, "gns/gHg": self.b_noise_ema.grad_sq_norm,
               "gns/trace_h_cov": self.b_noise_ema.trace_cov}
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def _b_noise_sample(self, pl_module: pl.LightningModule, n: int, size: int) -> NoiseScaleSample:
        """One sample of (GᵀHG, tr HΣ): ``b_noise_groups`` group gradients of ``size`` examples from the first half of
        the batch; Hessian-vector products on the second half by double backward (one forward and backward that
        keeps its graph, then one backward per product, so all products see the same dropout masks).

        Double backward rather than ``torch.func.jvp`` of ``grad``: forward-mode AD fails on ordinary losses (e.g.
        ``mse_loss(pred, torch.ones_like(pred))`` in Lightning's BoringModel) and on many custom kernels."""
        loss = self._loss_of(pl_module)
        groups = self.b_noise_groups
        params = list(trainable_parameters(pl_module).values())
        with loss.isolated(), batchnorm_eval(pl_module), twice_differentiable_attention():
            group_grads = []
            for k in range(groups):
                part = slice_batch(self._batch, slice(k * size, (k + 1) * size), _WHO)
                grads = torch.autograd.grad(loss.loss(part), params, allow_unused=True)
                group_grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
            hessian_batch = slice_batch(self._batch, slice(n // 2, n), _WHO)  # independent of the gradients
            first = torch.autograd.grad(loss.loss(hessian_batch), params, create_graph=True, allow_unused=True)
            # a gradient that does not depend on the parameters (None, or constant) is a zero row of H
            rows = [i for i, g in enumerate(first) if g is not None and g.requires_grad]

            def quad(v: list[Tensor]) -> float:
                if not rows:
                    return 0.0
                hv = torch.autograd.grad([first[i] for i in rows], params, grad_outputs=[v[i] for i in rows],
                                         retain_graph=True, allow_unused=True)
                return float(sum((x.double() * h.double()).sum() for x, h in zip(v, hv) if h is not None))

            q_small = sum(quad(g) for g in group_grads) / groups
            q_big = quad([sum(g[i] for g in group_grads) / groups for i in range(len(params))])
        return two_batch_estimate(q_small, size, q_big, groups * size)  # (GᵀHG, tr HΣ) in (|G|², trΣ) slots

    # --------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "layer_ema": {k: v.state_dict() for k, v in self.layer_ema.items()},
            "b_noise_ema": self.b_noise_ema.state_dict(),
            "measured": self.measured,
            "skipped": dict(self.skipped),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the EMAs and counters. Only ``"ema"`` is required; a state from a version without them gets the
        documented defaults: no per-layer EMAs, a fresh B_noise EMA, ``measured`` = the EMA's count, no skips.

        A ``beta`` other than the checkpoint's keeps the history and applies from the next measurement on, with a
        warning: each EMA tracks the total weight it carries (``1 - β^t`` for a constant β), so its debiased value
        stays a properly normalized weighted mean of the samples when β changes in the middle of a run.
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
        self.b_noise_ema = NoiseScaleEMA(self.beta)
        if "b_noise_ema" in state_dict:
            self.b_noise_ema.load_state_dict(state_dict["b_noise_ema"])
        self.measured = int(state_dict.get("measured", self.ema.count))
        self.skipped = {**self.skipped, **state_dict.get("skipped", {})}
        saved_beta = self.ema.beta
        for ema in (self.ema, self.b_noise_ema, *self.layer_ema.values()):
            ema.beta = self.beta
        if saved_beta != self.beta and self.ema.count:
            rank_zero_warn(f"GradientNoiseScale: the checkpoint's EMAs were built with beta={saved_beta}; this "
                           f"callback has beta={self.beta}, which applies from the next measurement on (the "
                           f"{self.ema.count} measurements so far keep their weights).")
