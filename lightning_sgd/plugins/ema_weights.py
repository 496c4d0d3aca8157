"""Exponential moving average of the weights, on top of Lightning's ``WeightAveraging``.

Draws on Lightning's ``WeightAveraging``/``EMAWeightAveraging`` (checkpoint layout, hooks), timm's
``utils/model_ema.py`` (``ModelEmaV3``: ``torch._foreach_lerp_`` update, decay warmup) and
``torch.optim.swa_utils.update_bn`` (BN recalibration). Each EMA update ``k`` (after an optimizer step) does

.. math::  \\bar\\theta_k = d_k \\bar\\theta_{k-1} + (1 - d_k)\\,\\theta_k, \\qquad \\bar\\theta_1 = \\theta_1,

with the decay ``d_k`` either fixed (``decay``) or given as a half-life in samples ``H``:
``d_k = 0.5 ** (n_k / H)``, where ``n_k`` is the number of training examples consumed since the previous update
(per-device batch x world size x accumulated batches x steps between updates), counted from the actual batches.
So the EMA's memory stays ``H`` examples when the batch size, the device count, the accumulation or the update
interval changes, also in the middle of a fit. ``warmup=True`` caps the decay as timm does:
``d_k <= 1 - (1 + (k - 1) / gamma) ** -power``.

What it adds to Lightning's ``EMAWeightAveraging``:

- parameters and buffers are matched BY NAME (a ghost-BN-converted model and its EMA copy still line up);
- the EMA starts at the first update (``start_step``): validation before that, and the sanity check, use the raw
  weights (Lightning's callback evaluates a never-updated copy of the initial weights);
- ``validate="ema"`` (default): validation runs with the EMA weights under the module's own keys (``val/...``);
  ``"both"``: validation runs with the raw weights (``val/...``) and the callback also evaluates the EMA weights
  and logs ``val_ema/loss`` (and ``val_ema/acc`` for classification) through the module's
  :mod:`lightning_sgd.protocols` contract; ``"raw"``: no EMA evaluation;
- BatchNorm buffers: ``"average"`` (EMA like parameters), ``"copy"`` (the raw model's buffers) or
  ``"recalibrate"`` (``update_bn``-style: recompute running statistics of the EMA weights on
  ``recalibrate_batches`` training batches before each EMA evaluation and at the end of training);
- after ``fit`` the module holds the EMA weights (as Lightning's callback does), and the raw weights stay
  available: :meth:`EMAWeights.raw_state_dict` / :meth:`EMAWeights.restore_raw_weights`; a checkpoint saved
  after fit stores the EMA weights as ``state_dict`` and the raw ones as ``current_model_state``;
- ``trainer.test(ckpt_path=...)`` / ``validate(ckpt_path=...)`` evaluate the checkpoint's EMA weights, also on a
  trainer that has just run ``fit`` (Lightning's callback would restore the raw weights there).
"""

from __future__ import annotations

import math
from itertools import islice
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_sgd.protocols import first_tensor, num_examples

__all__ = ["EMAWeights", "ema_decay"]

BN_BUFFER_MODES = ("average", "copy", "recalibrate")
VALIDATE_MODES = ("ema", "both", "raw")


def ema_decay(
    num_updates: int,
    samples: float,
    *,
    decay: float | None = None,
    half_life_samples: float | None = None,
    warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 0.75,
) -> float:
    """Decay of EMA update number ``num_updates + 1`` covering ``samples`` examples (0 for the first: a copy)."""
    if num_updates == 0:
        return 0.0
    d = 0.5 ** (samples / half_life_samples) if half_life_samples is not None else float(decay)
    if warmup:
        d = min(d, 1.0 - (1.0 + num_updates / warmup_gamma) ** -warmup_power)
    return d


class EMAWeights(WeightAveraging):
    """EMA of the weights with half-life-in-samples decay, decay warmup, delayed start and BN handling.

    Args:
        decay: fixed decay per update in (0, 1) (default 0.999 when ``half_life_samples`` is not given).
        half_life_samples: half-life of the average in training examples (mutually exclusive with ``decay``).
        warmup: timm-style decay warmup ``d_k <= 1 - (1 + (k-1)/warmup_gamma) ** -warmup_power``.
        warmup_gamma: warmup time scale in updates.
        warmup_power: warmup exponent (timm: 3/4 for short runs, 2/3 for long ones).
        update_every_n_steps: update the EMA every n optimizer steps.
        start_step: first optimizer step (0-based) whose weights enter the EMA; the EMA starts as a copy of them.
        bn_buffers: ``"average"``, ``"copy"`` or ``"recalibrate"`` (see the module docstring).
        recalibrate_batches: training batches used to recalibrate BN statistics.
        validate: ``"ema"``, ``"both"`` or ``"raw"`` (see the module docstring).
        device: where the EMA copy lives (``None``: the model's device; ``"cpu"`` saves accelerator memory).
    """

    def __init__(
        self,
        decay: float | None = None,
        half_life_samples: float | None = None,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 0.75,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        bn_buffers: str = "average",
        recalibrate_batches: int = 10,
        validate: str = "ema",
        device: str | None = None,
    ) -> None:
        if decay is not None and half_life_samples is not None:
            raise ValueError("EMAWeights: give decay or half_life_samples, not both.")
        if decay is None and half_life_samples is None:
            decay = 0.999
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"EMAWeights: decay must be in (0, 1), got {decay}.")
        if half_life_samples is not None and not half_life_samples > 0:
            raise ValueError(f"EMAWeights: half_life_samples must be > 0, got {half_life_samples}.")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(f"EMAWeights: warmup_gamma and warmup_power must be > 0, got {warmup_gamma}, "
                             f"{warmup_power}.")
        if update_every_n_steps < 1 or start_step < 0:
            raise ValueError(f"EMAWeights: need update_every_n_steps >= 1 and start_step >= 0, got "
                             f"{update_every_n_steps}, {start_step}.")
        if bn_buffers not in BN_BUFFER_MODES:
            raise ValueError(f"EMAWeights: bn_buffers must be one of {BN_BUFFER_MODES}, got {bn_buffers!r}.")
        if validate not in VALIDATE_MODES:
            raise ValueError(f"EMAWeights: validate must be one of {VALIDATE_MODES}, got {validate!r}.")
        if recalibrate_batches < 1:
            raise ValueError(f"EMAWeights: recalibrate_batches must be >= 1, got {recalibrate_batches}.")
        super().__init__(device=device, use_buffers=True)
        self.decay = decay
        self.half_life_samples = half_life_samples
        self.warmup, self.warmup_gamma, self.warmup_power = warmup, warmup_gamma, warmup_power
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.bn_buffers = bn_buffers
        self.recalibrate_batches = recalibrate_batches
        self.validate = validate
        self.last_decay: float | None = None
        self._pending_samples = 0.0
        self._raw_state: dict[str, Tensor] | None = None
        self._swapped = False
        self._needs_recalibration = False
        self._pairs: dict[str, list[tuple[Tensor, Tensor]]] | None = None

    # ---------------------------------------------------------------------------------------------- public helpers
    @property
    def num_updates(self) -> int:
        return int(self._average_model.n_averaged) if self._average_model is not None else 0

    @property
    def ema_module(self) -> nn.Module | None:
        """The EMA copy of the LightningModule (``None`` before ``fit``)."""
        return self._average_model.module if self._average_model is not None else None

    def raw_state_dict(self) -> dict[str, Tensor] | None:
        """The raw (non-averaged) ``state_dict`` of the module at the end of the last ``fit``."""
        return self._raw_state

    def restore_raw_weights(self, pl_module: nn.Module) -> None:
        """Load the raw weights of the end of the last ``fit`` back into ``pl_module``."""
        if self._raw_state is None:
            raise RuntimeError("EMAWeights: no raw weights stored; they are kept when fit ends with EMA weights.")
        pl_module.load_state_dict(self._raw_state)

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        return step_idx >= self.start_step and (step_idx - self.start_step) % self.update_every_n_steps == 0

    # -------------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # per-fit state; a checkpoint restored after setup() brings its own
            if self.validate == "both":
                from lightning_sgd.protocols import require_supervised

                require_supervised(pl_module, "EMAWeights(validate='both')")
            self._latest_update_step, self._pending_samples, self._raw_state = 0, 0.0, None
            self._pairs, self._swapped, self.last_decay = None, False, None
        super().setup(trainer, pl_module, stage)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        if self.half_life_samples is not None:
            self._pending_samples += num_examples(pl_module, batch, "EMAWeights") * trainer.world_size
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            decay = ema_decay(self.num_updates, self._pending_samples, decay=self.decay,
                              half_life_samples=self.half_life_samples, warmup=self.warmup,
                              warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power)
            self._update(pl_module, decay)
            self._pending_samples = 0.0
            self._latest_update_step = trainer.global_step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # updates are per optimizer step only

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer) and self.validate == "ema":
            self._recalibrate_if_needed(trainer, pl_module)
            self._swap_models(pl_module)
            self._swapped = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False
        elif self._active(trainer) and self.validate == "both" and not trainer.sanity_checking:
            self._recalibrate_if_needed(trainer, pl_module)
            self._swap_models(pl_module)
            try:
                metrics = self._evaluate(trainer, pl_module)
            finally:
                self._swap_models(pl_module)
            for name, value in metrics.items():
                pl_module.log(f"val_ema/{name}", value, sync_dist=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is None or self.num_updates == 0:
            return  # never updated: the module keeps its raw weights
        self._recalibrate_if_needed(trainer, pl_module)
        self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._copy_average_to_current(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending_samples": self._pending_samples, "last_decay": self.last_decay}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_samples = state_dict.get("pending_samples", 0.0)
        self.last_decay = state_dict.get("last_decay")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None or self.num_updates == 0:
            checkpoint["ema_weights_started"] = False  # the state_dict holds the raw weights, nothing else to store
            return
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None:  # after fit the module holds the EMA weights: keep the raw ones too
            checkpoint["current_model_state"] = self._raw_state

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING or self._average_model is None:
            return  # evaluating a checkpoint: its state_dict (the EMA weights) is what the module should hold
        if checkpoint.get("ema_weights_started") is False:
            return  # the EMA had not started; it will start as a copy at its first update
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._pairs = None

    # ---------------------------------------------------------------------------------------------------- internals
    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and self._average_model is not None and self.num_updates > 0

    def _named_pairs(self, pl_module: nn.Module) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """``(ema, model)`` tensor pairs matched by name: float params, float buffers, other buffers."""
        if self._pairs is None:
            assert self._average_model is not None
            ema = self._average_model.module
            ema_params, ema_buffers = dict(ema.named_parameters()), dict(ema.named_buffers())
            pairs: dict[str, list[tuple[Tensor, Tensor]]] = {"params": [], "float_buffers": [], "other_buffers": []}
            for name, param in pl_module.named_parameters():
                if name not in ema_params:
                    raise RuntimeError(f"EMAWeights: parameter {name!r} has no EMA copy (was the model changed "
                                       f"after setup?).")
                pairs["params"].append((ema_params[name].data, param.data))
            for name, buffer in pl_module.named_buffers():
                if name in ema_buffers:
                    kind = "float_buffers" if buffer.is_floating_point() else "other_buffers"
                    pairs[kind].append((ema_buffers[name], buffer))
            self._pairs = pairs
        return self._pairs

    @torch.no_grad()
    def _update(self, pl_module: pl.LightningModule, decay: float) -> None:
        assert self._average_model is not None
        pairs = self._named_pairs(pl_module)
        averaged = pairs["params"] + (pairs["float_buffers"] if self.bn_buffers == "average" else [])
        copied = pairs["other_buffers"] + (pairs["float_buffers"] if self.bn_buffers != "average" else [])
        if averaged:
            ema, model = zip(*averaged)
            model = [m.to(e.device, non_blocking=True) for e, m in zip(ema, model)]
            if decay == 0.0:
                torch._foreach_copy_(list(ema), model)
            else:
                torch._foreach_lerp_(list(ema), model, 1.0 - decay)
        for e, m in copied:
            e.copy_(m)
        self._average_model.n_averaged += 1
        self.last_decay = decay
        self._needs_recalibration = self.bn_buffers == "recalibrate"

    @torch.no_grad()
    @override
    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        pairs = self._named_pairs(pl_module)
        for e, m in pairs["params"] + pairs["float_buffers"] + pairs["other_buffers"]:
            tmp = m.clone()
            m.copy_(e)
            e.copy_(tmp)

    @torch.no_grad()
    @override
    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        pairs = self._named_pairs(pl_module)
        for e, m in pairs["params"] + pairs["float_buffers"] + pairs["other_buffers"]:
            m.copy_(e)

    @torch.no_grad()
    def _recalibrate_if_needed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recompute the EMA copy's BN running statistics on a few training batches (cumulative average).

        The batches come from a fresh iterator over the train DataLoader (which advances a shuffling sampler's
        random generator, as any extra pass over the loader would).
        """
        if not self._needs_recalibration or self._average_model is None:
            return
        self._needs_recalibration = False
        ema = self._average_model.module
        bns = [m for m in ema.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        if not bns:
            return
        momenta = {bn: bn.momentum for bn in bns}
        was_training = ema.training
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        ema.train()
        try:
            loader = trainer.train_dataloader
            device = next(ema.parameters()).device
            for batch in islice(iter(loader), self.recalibrate_batches):
                batch = trainer.strategy.batch_to_device(batch, device)
                inputs = ema.split_batch(batch)[0] if hasattr(ema, "split_batch") else first_tensor(batch)
                ema(inputs)
        finally:
            for bn, momentum in momenta.items():
                bn.momentum = momentum
            ema.train(was_training)

    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Mean loss (and accuracy for class logits) of ``pl_module`` over the validation batches Lightning uses."""
        from lightning_sgd.protocols import require_supervised

        require_supervised(pl_module, "EMAWeights(validate='both')")
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        limits = trainer.num_val_batches
        total_loss, correct, count, classified = 0.0, 0.0, 0, True
        for loader, limit in zip(loaders, limits):
            for batch in islice(iter(loader), None if math.isinf(limit) else int(limit)):
                batch = trainer.strategy.batch_to_device(batch)
                inputs, targets = pl_module.split_batch(batch)
                outputs = pl_module(inputs)
                n = int(targets.shape[0])
                total_loss += float(pl_module.loss(outputs, targets)) * n
                count += n
                if outputs.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1:
                    correct += float((outputs.argmax(1) == targets).sum())
                else:
                    classified = False
        if count == 0:
            return {}
        metrics = {"loss": total_loss / count}
        if classified:
            metrics["acc"] = correct / count
        return metrics
