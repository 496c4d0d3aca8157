"""DDP that measures local (per-rank) and global gradient norms around its all-reduce, at small cost.

:class:`GradStatsDDPStrategy` is Lightning's ``DDPStrategy`` that, on every synced backward,

- takes each rank's local squared norm |g_r|² of its gradient before the all-reduce (its mean-loss gradient),
- takes the global squared norm |ḡ|² of the all-reduced (averaged) gradient after it, and
- gathers all W local norms on every rank in one W-float all-reduce, launched asynchronously as soon as the local
  norm is known, so it runs while DDP still waits for its last bucket.

How, on every backend (gloo/CPU included; Lightning itself registers comm hooks on CUDA only):

- Default (no user comm hook, ``gradient_as_bucket_view=False``): no comm hook. DDP keeps its C++ all-reduce, with
  the 1/W division fused into its copy of the gradients into the buckets. A hook on the loss queues an autograd
  callback that runs at the end of backward *before* DDP's own (which copies the averaged buckets into
  ``.grad``): it takes |g_r|² from the local ``.grad`` (one fused ``_foreach_norm`` pass) and launches the W-float
  all-reduce; after backward one more pass over the averaged ``.grad`` gives |ḡ|². A Python comm hook alone
  (DDP calling Python per bucket, ``dist.all_reduce``'s Python wrapper, an unfused division) cost more than both
  norm passes together (``benchmarks/results/ddp_overhead_profile.md``).
- With a user hook, or ``gradient_as_bucket_view=True`` (``.grad`` is then the bucket itself, all-reduced in place
  while the callback would read it): a comm hook takes the norm of each bucket before the all-reduce (or the user
  hook) and of its result after it, and divides in place like DDP's default hook.

Both Lightning packages: :class:`GradStatsDDPStrategy` is a ``pytorch_lightning`` strategy and
:class:`LightningGradStatsDDPStrategy` its ``lightning.pytorch`` twin (``import lightning as L``): one class cannot
subclass both packages' ``DDPStrategy``, so both are the same :class:`GradStatsDDPMixin` on top of their package's
``DDPStrategy``. The name ``"ddp_grad_stats"`` is registered in both packages' ``StrategyRegistry`` (as soon as any
``lightning_sgd`` callback or plugin is imported), so ``Trainer(strategy="ddp_grad_stats")`` and
``trainer.strategy: ddp_grad_stats`` in LightningCLI YAML work under either package; to pass arguments, construct
the class of the Trainer's package (:func:`grad_stats_ddp_strategy` picks it from a package).

Each optimizer step it publishes an :class:`lightning_sgd.grad_stats.AllReduceGradStats` as
``strategy.latest_grad_stats`` (read by :class:`lightning_sgd.callbacks.GradientNoiseScale`: W small batches of
``local_batch_size`` and one big batch of ``global_batch_size``, McCandlish et al. 2018, App. A) and logs
``ddp/local_grad_norm_rank{r}`` (the straggler / outlier view) and ``ddp/global_grad_norm``.

Semantics (all norms are of mean-loss gradients as they reach the optimizer):

- Gradient accumulation: nothing is measured on ``no_sync`` micro-batches; on the last one DDP all-reduces the
  accumulated ``.grad``, which Lightning has built from losses divided by ``accumulate_grad_batches``: the mean-loss
  gradient of all micro-batches. So the local batch is ``micro-batches × per-device batch`` (counted from the
  batches ``training_step`` saw for this optimizer step); per-micro-batch norms are never seen.
- AMP: with a ``GradScaler`` (fp16 on CUDA) the gradients are scaled; norms are divided by the scale²
  used for that backward (read before the scaler updates it). Steps whose gradients overflowed (the scaler skips
  them) are not published. Tested on CPU with fp16 autocast and a CPU ``GradScaler``.
  bf16 autocast (CPU or CUDA) has no scaler and gradients are fp32: nothing to undo.
- Clipping happens after backward, so the norms are always those before clipping.
- A user hook (``ddp_comm_hook``, optionally with ``ddp_comm_wrapper``) is wrapped, not replaced: the local norm is
  taken from the bucket before the user hook runs, the global norm from what it returns, and the local norms
  travel in the W-float all-reduce after backward (launching it inside the hook could race with collectives that
  the user hook starts from future callbacks, as PowerSGD does; gloo needs the same order on all ranks). With fp16/bf16
  compression the global norm is of the rounded average; with PowerSGD or any other hook that changes the
  gradient's meaning, it is of the *compressed* gradient and a warning says so.
- Manual optimization: stats are published after every synced backward; ``local_batch_size`` counts the examples
  of the ``training_step`` calls of the current ``global_step`` (the loss must be a mean over them, as Lightning
  makes it under automatic optimization).
- ``every_n_steps``: the other steps run DDP's plain all-reduce with no extra work (on the comm-hook path: DDP's
  default hook, or the user's), so the record (whose ``step`` says which step it belongs to) is only refreshed on
  measured steps; GradientNoiseScale skips stale records.

Cost per measured step (default path): two memory passes over the gradient (|g_r|² and |ḡ|²), one W-float
all-reduce, and a few small tensor ops; nothing on ``no_sync`` micro-batches or unmeasured steps. Measured overhead:
BENCHMARKS.md (``benchmarks/ddp_overhead.py``; breakdown in ``benchmarks/results/ddp_overhead_profile.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy as _LDDPStrategy
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_sgd import compat
from lightning_sgd.batches import batch_size
from lightning_sgd.checks import check_bool, check_int
from lightning_sgd.compat import ddp_comm_settings
from lightning_sgd.core import amp_scale, at_backward_end, sq_norms
from lightning_sgd.grad_stats import AllReduceGradStats

__all__ = ["GradStatsDDPMixin", "GradStatsDDPStrategy", "LightningGradStatsDDPStrategy", "grad_stats_ddp_strategy"]

# Hooks whose all-reduced result is the plain average of the local gradients (up to fp16/bf16 rounding).
_MEAN_PRESERVING_HOOKS = {
    "allreduce_hook",
    "fp16_compress_hook",
    "bf16_compress_hook",
}
_SUPPORTED_BACKENDS = ("gloo", "nccl")


def _hook_name(hook: Callable | None) -> str:
    if hook is None:
        return "allreduce_hook"
    return getattr(hook, "__name__", type(hook).__name__)


class _NormRecorder:
    """What both recorders share: every rank's local |g_r|², gathered by a W-float all-reduce."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        self.synced = False  # set when a synced backward has been measured; cleared by collect()
        self.active = True  # measure in this backward (False on the steps that every_n_steps skips)
        self._slots: Tensor | None = None  # (W,) every rank's local |g_r|² after the all-reduce; reused
        self._slots_work: Any = None  # that all-reduce (async), waited for in collect()

    def _launch_rank_norms(self, local: Tensor) -> None:
        """All-reduce the W local totals, asynchronously: slot r holds rank r's |g_r|², the others 0."""
        slots = self._slots
        if slots is None or slots.dtype != local.dtype or slots.device != local.device:
            slots = self._slots = torch.zeros(self.world_size, dtype=local.dtype, device=local.device)  # (W,)
        else:
            slots.zero_()
        slots[self.rank] = local
        self._slots_work = dist.all_reduce(slots, group=self.process_group, async_op=True)

    def _rank_norms(self) -> Tensor:
        """Wait for the W local norms: (W,) fp64 on the CPU, a fresh tensor (the slots are reused next step)."""
        assert self._slots_work is not None and self._slots is not None
        self._slots_work.wait()
        self._slots_work = None
        return self._slots.to("cpu", torch.float64, copy=True)


class _BackwardEndRecorder(_NormRecorder):
    """No comm hook: DDP keeps its C++ all-reduce (and its division fused into the bucket copy).

    :func:`lightning_sgd.core.at_backward_end` runs our callback at the end of a synced backward, before DDP's own
    (which copies the averaged buckets into ``.grad``): so it sees every parameter's *local* ``.grad`` (all
    buckets already launched), takes |g_r|² in one fused pass and launches the W-float all-reduce of the local
    norms, which runs while DDP waits for the last bucket. After backward, ``.grad`` is the average: one more pass
    gives |ḡ|² (:meth:`collect`). Only used without gradient_as_bucket_view (then ``.grad`` is the bucket itself,
    divided and being all-reduced in place while the callback would read it).
    """

    def __init__(self, process_group: Any, params: list[Tensor]) -> None:
        super().__init__(process_group)
        self.params = params  # the DDP module's trainable parameters

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def arm(self, loss: Tensor) -> None:
        """Measure the backward that is about to start from ``loss`` (a synced one, on a measured step)."""
        at_backward_end(loss, self._at_backward_end)

    def _at_backward_end(self) -> None:
        self._launch_rank_norms(sq_norms(self._grads()).sum())
        self.synced = True

    def collect(self) -> tuple[Tensor, Tensor]:
        """After a synced backward: (every rank's local |g_r|² (W,), global |ḡ|²), fp64 on the CPU."""
        self.synced = False
        global_sq = sq_norms(self._grads()).sum().cpu()
        return self._rank_norms(), global_sq


class _BucketNormRecorder(_NormRecorder):
    """State of the comm hook (used with a user hook, or gradient_as_bucket_view): per-bucket squared norms."""

    def __init__(self, process_group: Any, user_hook: Callable | None = None, user_state: Any = None) -> None:
        super().__init__(process_group)
        self.user_hook, self.user_state = user_hook, user_state
        self.local_parts: list[Tensor] = []  # |local bucket|², in bucket order
        self.global_parts: list[Tensor] = []  # |averaged bucket|², in order of completion

    def _start(self, bucket: dist.GradBucket) -> Tensor:
        buffer = bucket.buffer()
        if bucket.index() == 0:  # the reducer launches buckets in index order: a new synced backward begins
            self.local_parts, self.global_parts, self._slots_work = [], [], None
        self.local_parts.append(sq_norms([buffer])[0])
        return buffer

    def plain(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """Average the bucket in place like DDP's default hook; the last bucket also sends the W local norms.

        They travel in their own W-float all-reduce, launched (on every rank in the same order) just before the
        last bucket's: packing them into the bucket's collective needs a copy of the whole bucket.
        """
        buffer = self._start(bucket)
        last = bucket.is_last()
        if last:
            self._launch_rank_norms(torch.stack(self.local_parts).sum())
        buffer.div_(self.world_size)
        fut = dist.all_reduce(buffer, group=self.process_group, async_op=True).get_future()
        return self._with_global_norm(fut, last)

    def wrapped(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """Run the user's hook on the bucket, taking the norm before it and the norm of its result.

        The user hook owns the bucket's collectives, so the local norms are all-reduced after backward
        (:meth:`collect`): launching that collective here would race with hooks that start their own collectives
        from future callbacks (PowerSGD), and gloo needs the same collective order on all ranks.
        """
        self._start(bucket)
        assert self.user_hook is not None
        return self._with_global_norm(self.user_hook(self.user_state, bucket), bucket.is_last())

    def _with_global_norm(self, fut: torch.futures.Future, last: bool) -> torch.futures.Future[Tensor]:
        def record(fut: torch.futures.Future) -> Tensor:
            value = fut.value()
            out = value[0] if isinstance(value, (list, tuple)) else value
            self.global_parts.append(sq_norms([out])[0])
            return out

        if last:
            self.synced = True
        return fut.then(record)

    def collect(self) -> tuple[Tensor, Tensor]:
        """After a synced backward: (every rank's local |g_r|² (W,), global |ḡ|²), fp64 on the CPU."""
        self.synced = False
        if self._slots_work is None:  # a user hook: its collectives could not carry the local norms
            self._launch_rank_norms(torch.stack(self.local_parts).sum())
        return self._rank_norms(), torch.stack(self.global_parts).sum().to("cpu", torch.float64)


def _grad_stats_hook(recorder, bucket):  # noqa: ANN001, ANN202 - DDP checks real (not string) annotations
    """The registered comm hook: ``(recorder, GradBucket) -> Future[Tensor]``."""
    if not recorder.active:  # a step that is not measured: exactly what DDP would do without us
        if recorder.user_hook is None:
            return default_hooks.allreduce_hook(recorder.process_group, bucket)
        return recorder.user_hook(recorder.user_state, bucket)
    if recorder.user_hook is None:
        return recorder.plain(bucket)
    return recorder.wrapped(bucket)


class _GradStatsLogger(compat.Callback):
    """Logs the strategy's per-step gradient norms through the LightningModule (added by the strategy)."""

    def __init__(self, max_logged_ranks: int) -> None:
        self.max_logged_ranks = max_logged_ranks

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        stats = getattr(trainer.strategy, "latest_grad_stats", None)
        if stats is None or stats.step != trainer.global_step:
            return
        local = stats.local_sq_norms.clamp_min(0).sqrt()  # (W,)
        metrics = {"ddp/global_grad_norm": math.sqrt(max(stats.global_sq_norm, 0.0)),
                   "ddp/local_grad_norm_max": float(local.max()), "ddp/local_grad_norm_min": float(local.min())}
        for r in range(min(len(local), self.max_logged_ranks)):
            metrics[f"ddp/local_grad_norm_rank{r}"] = float(local[r])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=stats.local_batch_size)


class GradStatsDDPMixin:
    """The measuring logic of :class:`GradStatsDDPStrategy`, placed before a package's ``DDPStrategy`` in the bases.

    Args:
        log_grad_norms: log ``ddp/global_grad_norm``, ``ddp/local_grad_norm_{min,max}`` and
            ``ddp/local_grad_norm_rank{r}`` every optimizer step (at the Trainer's ``log_every_n_steps``).
        max_logged_ranks: log per-rank norms for the first this many ranks only (min/max cover the rest).
        every_n_steps: measure on optimizer steps ``global_step % every_n_steps == 0`` only; the other steps run
            DDP's plain all-reduce (no norms, no overhead). 1 (default): every step.
        **kwargs: everything ``DDPStrategy`` takes, e.g. ``ddp_comm_hook``, ``ddp_comm_state``,
            ``ddp_comm_wrapper`` (wrapped, see the module docstring), ``static_graph``, ``bucket_cap_mb``.

    After each synced backward ``latest_grad_stats`` holds an :class:`AllReduceGradStats` (``None`` before the
    first step).
    """

    def __init__(self, *args: Any, log_grad_norms: bool = True, max_logged_ranks: int = 16, every_n_steps: int = 1,
                 **kwargs: Any) -> None:
        who = type(self).__name__
        check_int(who, "max_logged_ranks", max_logged_ranks, minimum=0)
        self.every_n_steps = check_int(who, "every_n_steps", every_n_steps, minimum=1)
        check_bool(who, "log_grad_norms", log_grad_norms)
        super().__init__(*args, **kwargs)
        self.log_grad_norms = log_grad_norms
        self.max_logged_ranks = max_logged_ranks
        self.latest_grad_stats: AllReduceGradStats | None = None
        self._recorder: _BackwardEndRecorder | _BucketNormRecorder | None = None
        self._counted_step, self._step_examples = -1, 0  # examples training_step saw for this optimizer step

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.log_grad_norms and not any(isinstance(c, _GradStatsLogger) for c in trainer.callbacks):
            trainer.callbacks.append(_GradStatsLogger(self.max_logged_ranks))

    @override
    def _register_ddp_hooks(self) -> None:  # the private DDPStrategy method compat.DDP_REGISTER_HOOKS names
        """Measure with DDP's own all-reduce when possible, else register the measuring comm hook (wrapping the
        user's) on every device type, not only CUDA."""
        assert isinstance(self.model, DistributedDataParallel)
        comm_hook, comm_state, comm_wrapper = ddp_comm_settings(self)
        user_hook = comm_hook
        if comm_wrapper is not None:
            user_hook = comm_wrapper(user_hook if user_hook is not None else default_hooks.allreduce_hook)
        self._warn_if_meaning_changes(user_hook, comm_hook, comm_wrapper)
        backend = dist.get_backend(self.model.process_group)
        if backend not in _SUPPORTED_BACKENDS:
            rank_zero_warn(f"GradStatsDDPStrategy: only tested on {_SUPPORTED_BACKENDS}, the process group uses "
                           f"{backend!r}; if the comm hook cannot be registered no gradient stats are recorded.")
        if user_hook is None and not getattr(self.model, "gradient_as_bucket_view", False):
            params = [p for p in self.model.module.parameters() if p.requires_grad]
            self._recorder = _BackwardEndRecorder(self.model.process_group, params)
            return
        recorder = _BucketNormRecorder(self.model.process_group, user_hook, comm_state)
        try:
            self.model.register_comm_hook(recorder, _grad_stats_hook)
        except RuntimeError as err:  # e.g. a backend without Future-based collectives
            rank_zero_warn(f"GradStatsDDPStrategy: could not register the gradient-norm comm hook on backend "
                           f"{backend!r} ({err}); training continues as plain DDP without gradient stats.")
            if user_hook is not None:
                self.model.register_comm_hook(comm_state, user_hook)
            return
        self._recorder = recorder

    @staticmethod
    def _warn_if_meaning_changes(user_hook: Callable | None, comm_hook: Callable | None,
                                 comm_wrapper: Callable | None) -> None:
        names = [_hook_name(comm_hook)]
        if comm_wrapper is not None:
            names.append(_hook_name(comm_wrapper))
        wrapper = _hook_name(comm_wrapper) if comm_wrapper is not None else None
        inner_ok = _hook_name(comm_hook) in _MEAN_PRESERVING_HOOKS
        wrapper_ok = wrapper in (None, "fp16_compress_wrapper", "bf16_compress_wrapper")
        if user_hook is None or (inner_ok and wrapper_ok):
            return
        rank_zero_warn(
            f"GradStatsDDPStrategy: the comm hook {' + '.join(names)} changes what is all-reduced (e.g. "
            "PowerSGD's low-rank approximation, or local SGD's subgroup averaging), so the recorded global gradient "
            "norm is the norm of the *compressed* averaged gradient, not of the true mean gradient; gradient noise "
            "scale estimates from it are biased. Local norms are still of the uncompressed local gradients.",
            category=UserWarning,
        )

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        step = self.lightning_module.trainer.global_step if self.lightning_module is not None else -1
        if step != self._counted_step:  # the first micro-batch of a new optimizer step
            self._counted_step, self._step_examples = step, 0
        self._step_examples += self._count_examples(batch)
        if self._recorder is not None:
            self._recorder.active = step % self.every_n_steps == 0
        return super().training_step(*args, **kwargs)

    def _count_examples(self, batch: Any) -> int:
        """Examples of a micro-batch (a ``TypeError`` naming the strategy for a batch without a tensor of
        examples: the record's batch sizes would be meaningless)."""
        return batch_size(batch, type(self).__name__)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        recorder = self._recorder
        if (isinstance(recorder, _BackwardEndRecorder) and recorder.active and closure_loss.requires_grad
                and isinstance(self.model, DistributedDataParallel) and self.model.require_backward_grad_sync):
            recorder.arm(closure_loss)  # a synced backward (not a no_sync micro-batch) on a measured step

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        recorder = self._recorder
        if recorder is None or not recorder.synced:
            return  # a no_sync micro-batch, or no hook
        local, global_sq = recorder.collect()  # (W,), () fp64 on the CPU
        inv = amp_scale(self.precision_plugin) ** -2  # a GradScaler's scale: the norms are of scaled gradients
        local, global_sq = local * inv, global_sq * inv
        global_value = float(global_sq)
        if not (math.isfinite(global_value) and bool(torch.isfinite(local).all())):
            return  # overflow: the scaler skips this step, so do not publish it
        local_batch = self._step_examples
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        self.latest_grad_stats = AllReduceGradStats(
            step=trainer.global_step if trainer is not None else -1,
            local_sq_norms=local,
            global_sq_norm=global_value,
            local_batch_size=local_batch,
            global_batch_size=recorder.world_size * local_batch,
        )

    @override
    def teardown(self) -> None:
        self._recorder = None
        super().teardown()


class GradStatsDDPStrategy(GradStatsDDPMixin, DDPStrategy):
    """``pytorch_lightning``'s ``DDPStrategy`` whose all-reduce also measures local (per-rank) and global gradient
    norms (arguments: :class:`GradStatsDDPMixin`; for ``lightning.pytorch``: :class:`LightningGradStatsDDPStrategy`,
    or ``strategy="ddp_grad_stats"`` under either package).

    Example::

        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=GradStatsDDPStrategy(every_n_steps=4))
    """


class LightningGradStatsDDPStrategy(GradStatsDDPMixin, _LDDPStrategy):
    """:class:`GradStatsDDPStrategy` for ``lightning.pytorch`` (``import lightning as L``): the same strategy on
    that package's ``DDPStrategy`` (arguments: :class:`GradStatsDDPMixin`).

    Example::

        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=LightningGradStatsDDPStrategy(every_n_steps=4))
    """


def grad_stats_ddp_strategy(package: ModuleType | str, **kwargs: Any) -> GradStatsDDPMixin:
    """The gradient-statistics DDP strategy for a Lightning package (``pytorch_lightning`` or ``lightning.pytorch``,
    the module or its name), built with ``kwargs``: what ``strategy="ddp_grad_stats"`` instantiates.

    >>> import lightning.pytorch
    >>> type(grad_stats_ddp_strategy(lightning.pytorch)).__name__
    'LightningGradStatsDDPStrategy'
    """
    name = package if isinstance(package, str) else package.__name__
    classes = {"pytorch_lightning": GradStatsDDPStrategy, "lightning.pytorch": LightningGradStatsDDPStrategy}
    if name not in classes:
        raise ValueError(f"grad_stats_ddp_strategy: unknown Lightning package {name!r}; expected one of "
                         f"{sorted(classes)}.")
    return classes[name](**kwargs)
