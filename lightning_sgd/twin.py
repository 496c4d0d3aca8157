"""The ideal world of the deep bootstrap (Nakkiran, Neyshabur, Sedghi 2021, "The Deep Bootstrap Framework: Good
Online Learners are Good Offline Generalizers"): a copy of the real model, with its own optimizer and LR schedulers,
trained one optimizer step at a time on batches it is handed.

:class:`Twin` knows nothing of the Trainer: :class:`lightning_sgd.callbacks.DeepBootstrap` decides when it steps,
which fresh batches it sees and how a batch reaches the device, and hands it the process group's ``all_reduce``
under DDP. One :meth:`Twin.step` mirrors one optimizer step of Lightning's automatic optimization: gradients of the
micro-batches accumulated (each loss divided by the accumulation count), averaged over processes with **one** flat
all-reduce per gradient dtype (which also carries the loss sum, the example count and which parameters got a
gradient on any process), clipped like the Trainer clips, then ``optimizer.step()``.

Example (no Trainer)::

    twin = Twin.clone(module)                  # deep copy + the copy's own configure_optimizers()
    loss, n = twin.step([batch_a, batch_b], accumulate=2, clip_val=1.0)
    twin.sync_schedulers([real_scheduler.last_epoch])
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sgd.batches import batch_size
from lightning_sgd.module_loss import ModuleLoss

__all__ = ["Twin", "optimizers_and_schedulers"]


class Twin:
    """A model with its own optimizer and LR schedulers, stepped by :meth:`step` on the batches it is given.

    Args:
        module: the twin's model (e.g. a deep copy of the real LightningModule; see :meth:`clone`).
        optimizer: its optimizer.
        schedulers: its LR schedulers (objects with ``step``, ``last_epoch``, ``state_dict``).
        loss: how a batch becomes a loss (default: ``ModuleLoss(module, "Twin")``, the module's ``training_step``).

    :attr:`steps` counts the optimizer steps taken. The twin's RNG draws (dropout) come from whatever RNG is current
    when :meth:`step` runs; the callback runs it inside its private stream.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = (),
                 loss: ModuleLoss | None = None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.schedulers = list(schedulers)
        self.loss = ModuleLoss(module, "Twin") if loss is None else loss
        self.steps = 0

    @classmethod
    def clone(cls, module: nn.Module, configure: Callable[[nn.Module], Any] | None = None) -> Twin:
        """A deep copy of ``module`` (bit-identical weights and buffers) with the optimizer and schedulers that
        ``configure(copy)`` returns (default: the copy's own ``configure_optimizers()``, in any form Lightning
        accepts). Refuses more than one optimizer and ``ReduceLROnPlateau`` (it would follow the real world's
        metric) with a ``ValueError`` saying why."""
        twin = copy.deepcopy(module)
        conf = configure(twin) if configure is not None else twin.configure_optimizers()
        optimizers, schedulers = optimizers_and_schedulers(conf)
        if len(optimizers) != 1:
            raise ValueError(f"the deep-bootstrap twin supports exactly one optimizer; configure_optimizers returned "
                             f"{len(optimizers)}.")
        if any(_reduces_on_plateau(s) for s in schedulers):
            raise ValueError("the deep-bootstrap twin cannot clone a ReduceLROnPlateau schedule: it would follow the "
                             "real world's metric. Use a fixed schedule (StepLR, CosineAnnealingLR, OneCycleLR, ...).")
        schedulers = [s["scheduler"] if isinstance(s, Mapping) else s for s in schedulers]
        return cls(twin, optimizers[0], schedulers)

    # ------------------------------------------------------------------------------------------------------ step
    def step(self, batches: Iterable[Any], *, accumulate: int = 1, clip_val: float | None = None,
             clip_algorithm: str = "norm", to_device: Callable[[Any], Any] = lambda batch: batch,
             context: Callable[[], AbstractContextManager] = nullcontext,
             all_reduce: Callable[[Tensor], Any] | None = None, world_size: int = 1) -> tuple[float, int]:
        """One optimizer step on ``batches`` (this process's micro-batches of the step).

        Each micro-batch's loss (computed inside ``context()``) is divided by ``accumulate`` and backpropagated.
        With ``all_reduce`` (an in-place sum over ``world_size`` processes, e.g. ``torch.distributed.all_reduce``)
        the gradients are averaged over the processes in one flat buffer per dtype. Returns ``(mean loss, examples)``
        over all processes; when the mean loss is not finite the optimizer does **not** step (the caller stops the
        twin) and ``steps`` is unchanged.
        """
        self.optimizer.zero_grad(set_to_none=True)
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        total, count = torch.zeros((), device=device, dtype=torch.float64), 0
        for batch in batches:
            batch = to_device(batch)
            n = batch_size(batch, "Twin.step")
            with context():
                loss = self.loss.loss(batch)
            (loss / accumulate).backward()
            total, count = total + loss.detach().double() * n, count + n
        if all_reduce is not None and world_size > 1:
            total, count = self._average_over_processes(all_reduce, world_size, total, count)
        mean_loss = float(total) / max(count, 1)
        if not math.isfinite(mean_loss):
            return mean_loss, count
        params = [p for p in self.module.parameters() if p.grad is not None]
        if clip_val:
            if clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip_val)
        self.optimizer.step()
        self.steps += 1
        return mean_loss, count

    def _average_over_processes(self, all_reduce: Callable[[Tensor], Any], world_size: int, total: Tensor,
                                count: int) -> tuple[Tensor, int]:
        """Average every gradient over the processes: one flat all-reduce per gradient dtype. The first buffer also
        carries the loss sum, the example count and, per parameter, whether it got a gradient on this process, so a
        parameter without a gradient anywhere keeps ``grad=None`` (as the optimizer would see on one process)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        first, got = True, torch.zeros(len(params), dtype=torch.bool)
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=total.device)
        for dtype, group in by_dtype.items():
            parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in group]
            if first:
                extra = torch.cat([has_grad, total.reshape(1), total.new_tensor([float(count)])]).to(dtype)
                parts.append(extra)
            flat = torch.cat(parts)
            all_reduce(flat)  # sum over the processes
            offset = 0
            for p in group:
                n = p.numel()
                p.grad = (flat[offset:offset + n] / world_size).view_as(p)
                offset += n
            if first:
                got = flat[offset:offset + len(params)] > 0
                total, count = flat[offset + len(params)].double(), int(round(float(flat[offset + len(params) + 1])))
                first = False
        for p, any_grad in zip(params, got.tolist()):
            if not any_grad:
                p.grad = None
        return total, count

    def sync_schedulers(self, clocks: Sequence[int]) -> None:
        """Step each scheduler until its clock (``last_epoch``) equals the matching entry of ``clocks`` (the real
        world's schedulers' clocks), so epoch-interval schedules and steps taken between calls stay aligned."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")  # before the twin's first step
            for scheduler, clock in zip(self.schedulers, clocks):
                while scheduler.last_epoch < clock:
                    scheduler.step()

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedulers": [s.state_dict() for s in self.schedulers], "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        self.steps = int(state["steps"])


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer) or all(hasattr(obj, a) for a in ("param_groups", "step", "zero_grad"))


def optimizers_and_schedulers(conf: Any) -> tuple[list[Any], list[Any]]:
    """The optimizers and LR schedulers (scheduler objects or Lightning's scheduler config dicts) of a
    ``configure_optimizers`` return, in Lightning's order, for the forms Lightning accepts: an optimizer, a list of
    them, ``([optimizers], [schedulers])``, ``{"optimizer": ..., "lr_scheduler": ...}`` or a list of such dicts."""
    if conf is None:
        return [], []
    if _is_optimizer(conf):
        return [conf], []
    if isinstance(conf, Mapping):
        return [conf["optimizer"]], [conf["lr_scheduler"]] if "lr_scheduler" in conf else []
    if isinstance(conf, (list, tuple)):
        if len(conf) == 2 and isinstance(conf[0], list) and all(_is_optimizer(o) for o in conf[0]):
            return list(conf[0]), list(conf[1]) if isinstance(conf[1], list) else [conf[1]]
        if all(isinstance(c, Mapping) for c in conf):
            return [c["optimizer"] for c in conf], [c["lr_scheduler"] for c in conf if "lr_scheduler" in c]
        if all(_is_optimizer(o) for o in conf):
            return list(conf), []
    raise ValueError(
        f"could not read the optimizer from configure_optimizers' {type(conf).__name__}; return an optimizer, "
        "([optimizer], [scheduler]) or {'optimizer': ..., 'lr_scheduler': ...}.")


def _reduces_on_plateau(scheduler: Any) -> bool:
    """A ``ReduceLROnPlateau`` (or a scheduler config flagged ``reduce_on_plateau``): it follows a metric."""
    if isinstance(scheduler, Mapping):
        return bool(scheduler.get("reduce_on_plateau")) or _reduces_on_plateau(scheduler.get("scheduler"))
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
