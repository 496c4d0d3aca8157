"""Where :class:`lightning_sgd.callbacks.GradientNoiseScale` gets its two batch sizes: one small class per source.

A source turns one optimizer step into unbiased samples of |G|² and tr Σ (:class:`NoiseScaleSample`, the
estimators of :mod:`lightning_sgd.noise_scale`), for the whole model and, when asked, per layer:

- :class:`AccumulationSource`: each micro-batch's gradient vs their mean (``accumulate_grad_batches > 1``).
- :class:`DDPSource`: the same with every micro-batch of every rank (more than one process).
- :class:`StrategyRecordSource`: one rank's whole step vs all ranks, from the record a gradient-statistics strategy
  publishes (:class:`lightning_sgd.plugins.GradStatsDDPStrategy`).
- :class:`PerExampleSource`: per-example gradient norms (b = 1) vs the batch.
- :class:`SplitSource`: equal parts of the batch vs the batch.

:class:`BNoiseEstimator` estimates B_noise with Hessian-vector products on its own schedule.

A source sees the step through the hooks the callback forwards (:meth:`NoiseScaleSource.start_batch`,
``before_backward``, ``after_backward``) and is asked for its samples in ``on_before_optimizer_step``, after AMP
unscaling and before clipping. To measure another way, subclass :class:`NoiseScaleSource` and pass an instance as
``GradientNoiseScale(source=...)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_sgd.batches import batch_size
from lightning_sgd.compat import current_fx_name, ddp_kwargs
from lightning_sgd.core import amp_scale, at_backward_end, per_example_engine, sq_norms
from lightning_sgd.module_loss import ModuleLoss, measuring, twice_differentiable_attention
from lightning_sgd.noise_scale import (
    NoiseScaleEMA,
    NoiseScaleSample,
    b_noise_estimate,
    micro_batches_estimate,
    per_example_estimate,
    split_estimate,
    two_batch_estimate,
)
from lightning_sgd.per_example import batchnorm_eval, layer_of, per_example_gradient_stats, trainable_parameters
from lightning_sgd.per_example_hooks import PerExampleNormHooks, choose_engine, validate

__all__ = ["AccumulationSource", "BNoiseEstimator", "DDPSource", "GradDifferences", "NoiseScaleSource",
           "ParamLayout", "PerExampleSource", "Skip", "SourceFailed", "SplitSource", "StrategyRecordSource"]

_WHO = "GradientNoiseScale"
#: The per-example hook engine checks that the per-example bias gradients add up to .grad on the first
#: _BIAS_CHECK_FIRST measurements and every _BIAS_CHECK_EVERY-th after (a loss term outside the layers is a property
#: of the run; the check is about ten small ops).
_BIAS_CHECK_FIRST, _BIAS_CHECK_EVERY = 5, 25


class Skip(Exception):  # noqa: N818 - a control-flow signal, not an error
    """This step gives no measurement; ``reason`` is the key counted in ``GradientNoiseScale.skipped``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourceFailed(Exception):  # noqa: N818 - the model's code failed inside the source; the cause is chained
    """The source cannot run this model (its code fails on the source's inputs): the callback falls back."""


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class ParamLayout:
    """The trainable parameters in module order (shared ones once) and how their squared norms are summed: a
    ``(P, K)`` 0/1 matrix whose first column is the whole model and, with ``per_layer``, one column per layer (the
    module owning the parameter). ``keys`` names the columns: ``""`` for the total, then the layer names."""

    def __init__(self, params: dict[str, Tensor], per_layer: bool = False) -> None:
        self.names, self.params = list(params), list(params.values())
        layers = list(dict.fromkeys(layer_of(name) for name in self.names)) if per_layer else []
        self.keys = ["", *layers]
        self.groups = torch.zeros(len(self.params), len(self.keys), dtype=torch.float64)  # (P, K)
        self.groups[:, 0] = 1.0
        for i, name in enumerate(self.names):
            if per_layer:
                self.groups[i, 1 + layers.index(layer_of(name))] = 1.0

    @classmethod
    def of(cls, module: nn.Module, per_layer: bool = False) -> ParamLayout:
        return cls(trainable_parameters(module), per_layer)

    def reduce(self, per_param: Tensor) -> Tensor:
        """``(..., P)`` per-parameter squared norms -> ``(..., K)`` float64 on the CPU (total, then per layer)."""
        return per_param.cpu().double() @ self.groups

    def sq_norms(self, grads: list[Tensor | None]) -> Tensor:
        """``(K,)`` squared norms of a gradient list in parameter order (``None``: no gradient)."""
        return self.reduce(sq_norms(grads))

    def estimates(self, small: Tensor, b_small: float, big: Tensor, b_big: float) -> dict[str, NoiseScaleSample]:
        """One two-batch estimate per column from ``(K,)`` mean small-batch and big-batch squared norms."""
        return {key: two_batch_estimate(float(small[j]), b_small, float(big[j]), b_big)
                for j, key in enumerate(self.keys)}


class NoiseScaleSource:
    """Base class: the hooks a source may use and the one method it must implement, :meth:`samples`.

    Class attributes: ``name`` (what ``GradientNoiseScale.source_in_use`` reports), ``default_interval`` (measure
    every this many steps when the callback has no schedule), ``reruns_module`` (the source runs the module's code
    again: the callback checks at setup that it can, and at the first measurement that the loss is a mean).
    """

    name = "custom"
    default_interval = 1
    reruns_module = False

    def setup(self, trainer: Any, pl_module: nn.Module, layout: ParamLayout, loss: ModuleLoss) -> None:
        """Per-run state; raise ``ValueError`` (before the first step) when the source cannot work for this run."""
        self.layout, self.loss = layout, loss

    def start_batch(self, trainer: Any, pl_module: nn.Module, batch: Any, n: int, due: bool) -> None:
        """Each micro-batch, before its forward: ``n`` examples; ``due``: this step is measured."""

    def before_backward(self, trainer: Any, loss: Tensor) -> None:
        """Each micro-batch, before its backward."""

    def after_backward(self, trainer: Any) -> None:
        """Each micro-batch, after its backward."""

    def samples(self, trainer: Any, pl_module: nn.Module, batch: Any) -> dict[str, NoiseScaleSample]:
        """The measured step's samples keyed as ``layout.keys`` (``""``: the whole model); ``batch`` is the step's
        (last micro-)batch. Raise :class:`Skip` to skip the step, :class:`SourceFailed` when the model cannot be
        measured this way."""
        raise NotImplementedError(f"{type(self).__name__} must implement samples(trainer, pl_module, batch).")

    def end_step(self) -> None:
        """After the optimizer step's measurement (measured or not): drop the step's state."""

    def teardown(self) -> None:
        """End of fit: remove hooks, free buffers."""


# ------------------------------------------------------------------------------------------- micro-batch sources
class GradDifferences:
    """Each micro-batch's gradient as the difference of ``.grad`` after and before its backward.

    ``torch._foreach_*`` passes over the gradients (norm + copy after the first micro-batch, subtract + norm + copy
    after the next ones, no copy after the last), one C++ call each. Memory: one copy of the gradients, allocated
    once. A parameter without ``.grad`` so far in the step (a branch not used yet) counts as 0.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self._prev: list[Tensor] = []  # .grad after the previous micro-batch
        self._valid: set[int] = set()  # parameters whose buffer holds this step's previous .grad

    def record(self, first: bool, last: bool) -> Tensor:
        """``(P,)`` float64 squared norms of this micro-batch's gradient, on the gradients' device."""
        params = self.params
        if not self._prev:
            self._prev = [torch.zeros_like(p) for p in params]
        if first:
            self._valid = set()
        present = [i for i, p in enumerate(params) if p.grad is not None]
        if not present:
            return torch.zeros(len(params), dtype=torch.float64)
        grads, prev = [params[i].grad for i in present], [self._prev[i] for i in present]
        if first:
            sq = sq_norms(grads)
        else:
            stale = [prev[j] for j, i in enumerate(present) if i not in self._valid]
            if stale:
                torch._foreach_zero_(stale)
            torch._foreach_sub_(prev, grads)  # prev = S_{k-1} - S_k = -g_k
            sq = sq_norms(prev)
        if not last:
            torch._foreach_copy_(prev, grads)
            self._valid.update(present)
        if len(present) == len(params):
            return sq
        out = torch.zeros(len(params), dtype=torch.float64, device=sq.device)
        out[torch.tensor(present, device=sq.device)] = sq
        return out

    def reset(self) -> None:
        self._prev, self._valid = [], set()


class _GradHooks:
    """A tensor hook per parameter: its gradient of the current backward (one micro-batch, this rank) before it is
    accumulated into ``.grad`` and before DDP averages it. Used when ``.grad`` is DDP's bucket
    (``gradient_as_bucket_view=True``), reduced in place, so differences of ``.grad`` would see the average."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self._norms: dict[int, Tensor] | None = None
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int):  # noqa: ANN202
        def hook(grad: Tensor) -> None:
            if self._norms is not None:  # one small kernel per parameter; squared and summed once per step
                self._norms[index] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)

        return hook

    def arm(self) -> None:
        self._norms = {}

    def collect(self) -> Tensor | None:
        """``(P,)`` float64 squared norms of the armed backward's gradients; ``None`` when not armed."""
        norms, self._norms = self._norms, None
        if norms is None:
            return None
        out = torch.zeros(len(self.params), dtype=torch.float64)
        if norms:
            out[list(norms)] = torch.stack(list(norms.values())).double().cpu().square()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class AccumulationSource(NoiseScaleSource):
    """Micro-batch gradients vs their mean: zero extra FLOPs (``Trainer(accumulate_grad_batches >= 2)``).

    Each micro-batch's gradient is read as a difference of ``.grad`` (:class:`GradDifferences`). Under DDP the same
    runs on every rank and one all-reduce of a few scalars per measured step combines them: for the synced
    backward the difference is taken in an autograd-engine callback that runs before DDP overwrites ``.grad`` with
    the average (:func:`lightning_sgd.core.at_backward_end`), which also launches that all-reduce so it overlaps
    DDP's last bucket. With ``gradient_as_bucket_view=True`` a tensor hook per parameter reads the gradients
    instead. Micro-batches of unequal size are fine (:func:`lightning_sgd.noise_scale.micro_batches_estimate`).

    Public after setup: ``differencing`` (True: ``.grad`` differences; False: tensor hooks).
    """

    name = "accumulation"

    def setup(self, trainer: Any, pl_module: nn.Module, layout: ParamLayout, loss: ModuleLoss) -> None:
        super().setup(trainer, pl_module, layout, loss)
        self._check(trainer, pl_module)
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{_WHO}(source={self.name!r}) reads gradients as Lightning's automatic optimization accumulates "
                f"them, but {type(pl_module).__name__} uses manual optimization (automatic_optimization=False); "
                "remove the callback, or implement split_batch/forward/loss and use source='per_example' or 'split'.")
        bucket_view = ddp_kwargs(trainer.strategy).get("gradient_as_bucket_view", False)
        self.differencing = trainer.world_size == 1 or not bucket_view
        self._differences = GradDifferences(layout.params)
        self._hooks = None if self.differencing else _GradHooks(layout.params)
        self._micro: list[Tensor] = []  # per measured micro-batch: (P,) squared norms of its gradient
        self._sizes: list[int] = []  # and its examples
        self._step = -1
        self._armed = self._in_engine = False
        self._work: tuple[Any, Tensor] | None = None  # (async all-reduce, its buffer) of this step's scalars

    def _check(self, trainer: Any, pl_module: nn.Module) -> None:
        if trainer.accumulate_grad_batches < 2:
            raise ValueError(f"{_WHO}(source='accumulation') needs Trainer(accumulate_grad_batches >= 2): with one "
                             "micro-batch B_small == B_big. Use source='auto'.")

    def start_batch(self, trainer: Any, pl_module: nn.Module, batch: Any, n: int, due: bool) -> None:
        if trainer.global_step != self._step:  # the first micro-batch of this optimizer step
            self._step = trainer.global_step
            self.end_step()
        if due:
            self._sizes.append(n)
            if self._hooks is not None:
                self._hooks.arm()
            self._armed = self.differencing

    def before_backward(self, trainer: Any, loss: Tensor) -> None:
        if not (self._armed and trainer.world_size > 1 and loss.requires_grad):
            return
        if getattr(trainer.strategy.model, "require_backward_grad_sync", True):  # not a no_sync micro-batch
            self._in_engine = True
            at_backward_end(loss, self._at_synced_backward_end)

    def _at_synced_backward_end(self) -> None:
        """End of a synced DDP backward, before DDP's finalize: this rank's last difference, and the one all-reduce
        of this step's scalars."""
        self._micro.append(self._differences.record(first=not self._micro, last=True))
        stats = self._local_stats().to(self.layout.params[0].device)  # NCCL reduces device tensors only
        self._work = (torch.distributed.all_reduce(stats, async_op=True), stats)

    def after_backward(self, trainer: Any) -> None:
        if self._hooks is not None:
            norms = self._hooks.collect()
            if norms is not None:
                self._micro.append(norms)
        if self._armed:
            self._armed = False
            if self._in_engine:  # done by the engine callback
                self._in_engine = False
            else:
                last = len(self._sizes) >= trainer.accumulate_grad_batches  # the step's last micro-batch
                self._micro.append(self._differences.record(first=not self._micro, last=last))

    def _local_stats(self) -> Tensor:
        """(K + 2,) float64: Σ_k |g_k|² (total, per layer) over this rank's micro-batches, Σ_k 1/b_k, W_local."""
        sums = self.layout.reduce(torch.stack(self._micro)).sum(0)
        extra = torch.tensor([sum(1.0 / b for b in self._sizes), float(len(self._micro))], dtype=torch.float64)
        return torch.cat([sums, extra])

    def samples(self, trainer: Any, pl_module: nn.Module, batch: Any) -> dict[str, NoiseScaleSample]:
        work, self._work = self._work, None
        if work is not None:
            work[0].wait()
        if not self._micro or len(self._micro) != len(self._sizes):
            raise Skip("too_few")
        # Lightning divides each micro-batch loss by accumulate_grad_batches (A); AMP multiplies it by the scale.
        # .grad = (1/A) Σ_k g_k (averaged over ranks by DDP): the mean of the small-batch gradients is .grad·A/W.
        accumulate = trainer.accumulate_grad_batches
        big = self.layout.sq_norms([p.grad for p in self.layout.params]) * (accumulate / len(self._micro)) ** 2
        if work is not None:
            stats = work[1].double().cpu()
        else:
            stats = self._local_stats()
            if trainer.world_size > 1:
                stats = trainer.strategy.reduce(stats.to(pl_module.device), reduce_op="sum").double().cpu()
        *sums, inv_sizes, count = stats.tolist()
        if count < 2:
            raise Skip("too_few")
        factor = (accumulate / amp_scale(trainer.precision_plugin)) ** 2  # -> gradients of the micro-batch means
        return {key: micro_batches_estimate(sums[j] * factor, inv_sizes, int(count), big[j])
                for j, key in enumerate(self.layout.keys)}

    def end_step(self) -> None:
        self._micro, self._sizes, self._armed, self._in_engine = [], [], False, False

    def teardown(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._differences.reset()
        self._work = None
        self.end_step()


class DDPSource(AccumulationSource):
    """Every micro-batch on every rank is one small batch, compared with the all-reduced gradient (more than one
    process; the mechanics of :class:`AccumulationSource`)."""

    name = "ddp"

    def _check(self, trainer: Any, pl_module: nn.Module) -> None:
        _check_processes(trainer)


def _check_processes(trainer: Any) -> None:
    if trainer.world_size < 2:
        raise ValueError(f"{_WHO}(source='ddp') needs more than one process (B_small == B_big on one device); "
                         "use source='auto'.")


class StrategyRecordSource(NoiseScaleSource):
    """One rank's whole step (its local gradient) vs all ranks (the all-reduced one), from the record the strategy
    publishes as ``strategy.latest_grad_stats`` (:class:`lightning_sgd.grad_stats.AllReduceGradStats`): no extra
    work in the callback. The whole model only (the record has no per-layer norms). A record from another step is
    never paired with this one: the step is skipped as ``"stale"`` (one warning)."""

    name = "ddp"

    def setup(self, trainer: Any, pl_module: nn.Module, layout: ParamLayout, loss: ModuleLoss) -> None:
        super().setup(trainer, pl_module, layout, loss)
        _check_processes(trainer)
        if len(layout.keys) > 1:
            rank_zero_warn(f"{_WHO}: per_layer is not available from the strategy's grad-stats record; only the "
                           "total is measured.")
        self._warned = False

    def samples(self, trainer: Any, pl_module: nn.Module, batch: Any) -> dict[str, NoiseScaleSample]:
        record = getattr(trainer.strategy, "latest_grad_stats", None)
        if record is None or record.step != trainer.global_step:
            if not getattr(self, "_warned", False):
                self._warned = True
                rank_zero_warn(f"{_WHO}: the strategy's grad-stats record is "
                               f"{'missing' if record is None else f'for step {record.step}'} at step "
                               f"{trainer.global_step}; skipping (counted in skipped['stale']).")
            raise Skip("stale")
        small = float(torch.as_tensor(record.local_sq_norms, dtype=torch.float64).mean())
        return {"": two_batch_estimate(small, record.local_batch_size, record.global_sq_norm,
                                       record.global_batch_size)}


# ----------------------------------------------------------------------------------------- sources that compute
def _examples(batch: Any) -> int:
    n = batch_size(batch, _WHO)
    if n < 2:  # e.g. the last batch of an epoch without drop_last
        raise Skip("too_few")
    return n


class PerExampleSource(NoiseScaleSource):
    """Per-example gradient norms (b = 1) vs the batch gradient: the largest gap between the two batch sizes.

    Engines (``engine``): ``"hooks"`` reads the norms off the training step's own backward with layer hooks
    (:class:`lightning_sgd.per_example_hooks.PerExampleNormHooks`: a measured step costs the training step plus a
    few small products per layer); ``"vmap"`` re-runs the batch through
    :func:`lightning_sgd.per_example.per_example_gradient_stats` (``chunk_size`` examples at a time); ``"auto"``
    uses the hooks when they can serve the run (supported layers, one process, no accumulation, automatic
    optimization) and, timed once on the first measured batch
    (:func:`lightning_sgd.per_example_hooks.choose_engine`), are the cheaper of the two. The hooks are checked
    against ``vmap`` on a few examples at the first measurement, every measurement checks that each layer ran once,
    and the first measurements (then every 25th) that the per-example bias gradients add up to ``.grad``; on any
    mismatch (tied weights, a parameter used outside its layer, a loss term outside the layers) it warns and uses
    ``vmap`` for the rest of the run. Refuses models with BatchNorm (per-example gradients in train mode are
    ill-defined).

    ``layers="norm"``: |G|² and tr Σ over the parameters of the normalization layers only (LayerNorm, RMSNorm,
    GroupNorm, ...; :func:`lightning_sgd.per_example_hooks.is_norm_layer`), whose per-example gradients are nearly
    free to read and track the whole model's noise scale in transformers (Gray et al. 2024, "Normalization Layer
    Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in Transformers"). It is a different
    quantity from the whole model's B_simple: compare it with a ``layers="all"`` run before relying on it.

    Public: ``engine_in_use`` (``"hooks"``/``"vmap"`` after any fallback), ``hooks_validated`` (the hooks passed
    the check against ``vmap``), ``parameter_names`` (what |G|² and tr Σ are over).
    """

    name = "per_example"
    default_interval = 50
    reruns_module = True

    def __init__(self, engine: str = "auto", chunk_size: int | None = 64, layers: str = "all") -> None:
        self.engine, self.chunk_size, self.layers = engine, chunk_size, layers
        self.hooks: PerExampleNormHooks | None = None
        self.hooks_validated = False
        self.parameter_names: list[str] = []

    @property
    def engine_in_use(self) -> str:
        return "hooks" if self.hooks is not None else "vmap"

    def setup(self, trainer: Any, pl_module: nn.Module, layout: ParamLayout, loss: ModuleLoss) -> None:
        super().setup(trainer, pl_module, layout, loss)
        if has_batchnorm(pl_module):
            raise ValueError(
                f"{_WHO}(source='per_example'): the model has BatchNorm, whose per-example gradients in train mode "
                "are ill-defined (each example's loss depends on the whole batch). Use source='split' (or 'auto', "
                "which picks it), or replace BatchNorm by GroupNorm/LayerNorm.")
        per_layer = len(layout.keys) > 1
        if self.layers == "norm":
            names = PerExampleNormHooks(pl_module, layers="norm").selected_parameter_names()
            if not names:
                raise ValueError(f"{_WHO}(layers='norm'): {type(pl_module).__name__} has no normalization layer with "
                                 "trainable parameters (LayerNorm, RMSNorm, GroupNorm, ...). Use layers='all'.")
            params = dict(zip(layout.names, layout.params))
            self.layout = ParamLayout({name: params[name] for name in names}, per_layer)
        self.parameter_names = list(self.layout.names)
        self._indices = [layout.names.index(name) for name in self.parameter_names]  # in trainable order
        context = ((["more than one process (.grad is the all-reduced gradient)"] if trainer.world_size > 1 else [])
                   + (["gradient accumulation (.grad spans several backward passes)"]
                      if trainer.accumulate_grad_batches > 1 else [])
                   + ([] if pl_module.automatic_optimization else ["manual optimization"]))
        engine, reasons = per_example_engine(pl_module, self.engine, _WHO, context, self.layers)
        self.hooks, self.hooks_validated, self._measured, self._timed = None, False, 0, self.engine != "auto"
        if engine == "hooks":
            # only the training step's own forward: other callbacks' passes run under their own hook names or
            # inside a measurement (ModuleLoss.isolated) that re-runs training_step
            self.hooks = PerExampleNormHooks(
                pl_module, layer_names=per_layer, layers=self.layers,
                capture_if=lambda: current_fx_name(pl_module) == "training_step" and not measuring())
        elif self.engine == "auto" and reasons:
            rank_zero_info(f"{_WHO}: per-example norms through vmap (a second pass per measured step), since the "
                           f"layer-hook engine does not apply: {'; '.join(reasons)}.")

    def start_batch(self, trainer: Any, pl_module: nn.Module, batch: Any, n: int, due: bool) -> None:
        if self.hooks is None or not due or n < 2:
            return
        if not self._timed:  # engine="auto": once, on the first measured batch, before its forward
            self._timed = True
            faster = choose_engine(pl_module, batch, loss=self.loss, layers=self.layers, chunk_size=self.chunk_size)
            if faster != "hooks":
                rank_zero_info(f"{_WHO}: per-example norms through vmap: timed on this model and batch, it costs "
                               "less than the layer hooks.")
                self._drop_hooks()
                return
        self.hooks.arm(n)  # n: inputs broadcast over the batch (shape[0] != n) are told apart

    def samples(self, trainer: Any, pl_module: nn.Module, batch: Any) -> dict[str, NoiseScaleSample]:
        n = _examples(batch)
        try:
            if self.hooks is not None and self.hooks.armed:
                out = self._hook_samples(trainer, pl_module, batch, n)
                if out is not None:
                    return out
            stats = per_example_gradient_stats(pl_module, batch, loss=self.loss, chunk_size=self.chunk_size,
                                               per_layer=len(self.layout.keys) > 1 or self.layers == "norm")
        except Exception as err:  # noqa: BLE001 - any failure of the model's code per example: fall back
            self._drop_hooks()
            raise SourceFailed(f"{type(err).__name__}: {err}") from err
        finally:
            self._measured += 1
        layer_sq = stats.layer_sq_norms or {}
        total = (stats.sq_norms if self.layers == "all"  # else the norm layers' parameters only
                 else torch.stack([layer_sq[layer] for layer in dict.fromkeys(map(layer_of, self.parameter_names))]
                                  ).sum(0))
        big = self.layout.sq_norms([stats.mean_grad[i] for i in self._indices])
        return {key: per_example_estimate(total if not key else layer_sq[key], big[j])
                for j, key in enumerate(self.layout.keys)}

    def _hook_samples(self, trainer: Any, pl_module: nn.Module, batch: Any,
                      n: int) -> dict[str, NoiseScaleSample] | None:
        """Samples from the norms the layer hooks read off this step's backward; ``None`` (after switching to vmap
        for good, with a warning) when they cannot be trusted."""
        hooks = self.hooks
        assert hooks is not None
        scale = amp_scale(trainer.precision_plugin)
        checking = self._measured < _BIAS_CHECK_FIRST or self._measured % _BIAS_CHECK_EVERY == 0
        problem = hooks.check_bias_sums(scale) if checking else None
        sq, layer_sq, collect_problem = hooks.collect()
        problem = problem or collect_problem
        if problem is None and sq is not None and sq.numel() != n:
            problem = f"the hooks saw {sq.numel()} examples, the batch has {n}"
        if problem is None and not self.hooks_validated:
            try:  # runs the module's code isolated (ModuleLoss.isolated), in eval mode
                problem = validate(pl_module, batch, loss=self.loss, layers=self.layers)
            except Exception as err:  # noqa: BLE001 - the cross-check cannot run this model: do not trust the hooks
                problem = f"the cross-check against vmap failed: {type(err).__name__}: {err}"
            self.hooks_validated = problem is None
        if problem is not None:
            rank_zero_warn(f"{_WHO}: per-example norms from layer hooks cannot be trusted for this model ({problem}); "
                           "measuring through vmap from now on. Pass engine='vmap' to skip the hooks.")
            self._drop_hooks()
            return None
        assert sq is not None
        factor = (n / scale) ** 2  # contributions to the mean loss, AMP-scaled -> per-example gradients
        big = self.layout.sq_norms([p.grad for p in self.layout.params])
        return {key: per_example_estimate((sq if not key else layer_sq.get(key, torch.zeros_like(sq))) * factor,
                                          big[j]) for j, key in enumerate(self.layout.keys)}

    def use_engine(self, engine: str) -> None:
        """Measure with ``engine`` (``"hooks"`` or ``"vmap"``) without timing the two: what a resumed run restores
        from its checkpoint, so it continues on the engine the uninterrupted run used. ``"hooks"`` where the hooks
        cannot serve this run keeps vmap."""
        self._timed = True
        if engine == "vmap":
            self._drop_hooks()

    def _drop_hooks(self) -> None:
        if self.hooks is not None:
            self.hooks.disarm()
            self.hooks = None

    def teardown(self) -> None:
        if self.hooks is not None:  # kept: engine_in_use still tells what measured this run
            self.hooks.disarm()


class SplitSource(NoiseScaleSource):
    """The batch split into ``parts`` equal parts (remainder dropped), one extra forward/backward of the module's
    loss per part (:func:`lightning_sgd.noise_scale.split_estimate`), inside
    :meth:`lightning_sgd.module_loss.ModuleLoss.isolated`: buffers (BatchNorm statistics), modes, the RNG and what
    ``training_step`` logs are restored, so training is unaffected. Works with BatchNorm (each part normalized by
    its own statistics, like ghost batch norm)."""

    name = "split"
    default_interval = 50
    reruns_module = True

    def __init__(self, parts: int = 4) -> None:
        self.parts = parts

    def samples(self, trainer: Any, pl_module: nn.Module, batch: Any) -> dict[str, NoiseScaleSample]:
        _examples(batch)
        try:
            with self.loss.isolated():
                found = split_estimate(self.loss.loss, self.layout.params, batch, self.parts, self.layout.groups,
                                       _WHO)
        except Exception as err:  # noqa: BLE001 - any failure of the model's code on a part
            raise SourceFailed(f"{type(err).__name__}: {err}") from err
        return dict(zip(self.layout.keys, found))


# ------------------------------------------------------------------------------------------------------ B_noise
class BNoiseEstimator:
    """B_noise = tr(HΣ)/(GᵀHG) on its own schedule (:func:`lightning_sgd.noise_scale.b_noise_estimate` on the
    module's loss, isolated, BatchNorm in eval mode), smoothed by its own :class:`NoiseScaleEMA` (``ema``).

    A batch too small to split (fewer than ``2 * groups`` examples) is skipped as ``"too_few"`` with one warning
    naming ``b_noise_groups``; a model the estimate cannot run on turns it off for the run (one warning)."""

    def __init__(self, groups: int = 4, beta: float = 0.95) -> None:
        self.groups = groups
        self.ema = NoiseScaleEMA(beta)
        self.off = False
        self._warned_batch = False

    def start(self) -> None:
        """A new fit: the estimate is on again (the EMA is kept: it is part of the resumable state)."""
        self.off, self._warned_batch = False, False

    def check_batch(self, n: int | None) -> bool:
        """Can a batch of ``n`` examples be split (half into ``groups`` groups of >= 1 example, half for the
        Hessian)? If not, warn once."""
        if not isinstance(n, int) or n >= 2 * self.groups:
            return True
        if not self._warned_batch:
            self._warned_batch = True
            rank_zero_warn(
                f"{_WHO}: a batch of {n} example(s) is too small for the B_noise estimate with b_noise_groups="
                f"{self.groups}: it needs >= 2 * b_noise_groups = {2 * self.groups} examples (half split into the "
                "groups, half for the Hessian). Those estimates are skipped (counted in skipped['too_few']); lower "
                "b_noise_groups or raise the batch size.")
        return False

    def measure(self, pl_module: nn.Module, loss: ModuleLoss, batch: Any) -> dict[str, float]:
        """Estimate on ``batch`` and update the EMA; the metrics to log. Raises :class:`Skip` (``"too_few"``,
        ``"nonfinite"``, ``"failed"`` the first time it fails)."""
        if self.off:
            return {}
        if not self.check_batch(batch_size(batch, _WHO)):
            raise Skip("too_few")
        params = list(trainable_parameters(pl_module).values())
        try:
            with loss.isolated(), batchnorm_eval(pl_module), twice_differentiable_attention():
                sample = b_noise_estimate(loss.loss, params, batch, self.groups, _WHO)
        except Exception as err:  # noqa: BLE001 - never a crash mid-run: stop this estimate instead
            self.off = True
            rank_zero_warn(f"{_WHO}: the B_noise estimate cannot run on this model ({type(err).__name__}: {err}); "
                           "it is off for the rest of the run (B_simple goes on).")
            raise Skip("failed") from err
        if not (math.isfinite(sample.grad_sq_norm) and math.isfinite(sample.trace_cov)):
            raise Skip("nonfinite")
        loss.check_mean(batch)
        self.ema.update(sample)
        out = {"gns/b_noise": self.ema.b_simple, "gns/b_noise_se": self.ema.b_simple_se,
               "gns/gHg": self.ema.grad_sq_norm, "gns/trace_h_cov": self.ema.trace_cov}
        return {k: v for k, v in out.items() if math.isfinite(v)}
