"""Exponential moving average of the weights, with Lightning's ``WeightAveraging`` checkpoint layout.

Draws on Lightning's ``WeightAveraging``/``EMAWeightAveraging`` (checkpoint layout, hooks, ``should_update``),
timm's ``utils/model_ema.py`` (``ModelEmaV3``: ``torch._foreach_lerp_`` update, decay warmup) and
``torch.optim.swa_utils.update_bn`` (BN recalibration). Each EMA update ``k`` (after an optimizer step) does

.. math::  \\bar\\theta_k = d_k \\bar\\theta_{k-1} + (1 - d_k)\\,\\theta_k, \\qquad \\bar\\theta_1 = \\theta_1,

with the decay ``d_k`` either fixed (``decay``) or given as a half-life in samples ``H``:
``d_k = 0.5 ** (n_k / H)``, where ``n_k`` is the number of training examples consumed since the previous update
(per-device batch x world size x accumulated batches x steps between updates), counted from the actual batches
(:func:`lightning_sgd.batches.batch_size`: any batch structure). So the EMA's memory stays ``H`` examples when the
batch size, the device count, the accumulation or the update interval changes, also in the middle of a fit.
``warmup=True`` caps the decay as timm does: ``d_k <= 1 - (1 + (k - 1) / gamma) ** -power``.

What it adds to Lightning's ``EMAWeightAveraging``:

- one class for both Lightning packages (``pytorch_lightning`` and ``lightning.pytorch``): it derives from
  :class:`lightning_sgd.compat.Callback` and keeps the EMA copy in a ``torch.optim.swa_utils.AveragedModel``, with
  ``WeightAveraging``'s checkpoint layout (``state_dict`` = EMA weights, ``current_model_state``,
  ``averaging_state``), so checkpoints of either callback load into the other;
- parameters and buffers are matched BY NAME (a ghost-BN-converted model and its EMA copy still line up);
- the EMA starts at the first update (``start_step``): validation before that, and the sanity check, use the raw
  weights (Lightning's callback evaluates a never-updated copy of the initial weights);
- ``validate="ema"`` (default): validation runs with the EMA weights under the module's own keys (``val/...``);
  ``"both"``: validation runs with the raw weights (``val/...``) and the callback also evaluates the EMA weights
  and logs ``val_ema/loss``: the mean over the validation batches (weighted by their sizes) of the module's own
  training loss (its ``training_step``, through :class:`lightning_sgd.module_loss.ModuleLoss`, in eval mode under
  ``no_grad``, logging muted), and ``val_ema/acc`` when the module implements the optional
  ``split_batch``/``forward``/``loss`` protocol and its outputs are class logits; ``"raw"``: no EMA evaluation;
- BatchNorm buffers: ``"average"`` (EMA like parameters), ``"copy"`` (the raw model's buffers) or
  ``"recalibrate"`` (``update_bn``-style: recompute running statistics of the EMA weights by running the module's
  ``training_step`` in train mode on ``recalibrate_batches`` training batches, before each EMA evaluation and at
  the end of training);
- after ``fit`` the module holds the EMA weights (as Lightning's callback does), and the raw weights stay
  available: :meth:`EMAWeights.raw_state_dict` / :meth:`EMAWeights.restore_raw_weights`; a checkpoint saved
  after fit stores the EMA weights as ``state_dict`` and the raw ones as ``current_model_state``;
- ``trainer.test(ckpt_path=...)`` / ``validate(ckpt_path=...)`` evaluate the checkpoint's EMA weights, also on a
  trainer that has just run ``fit`` (Lightning's callback would restore the raw weights there).

``validate="both"`` and ``bn_buffers="recalibrate"`` (on a model with BatchNorm) re-run ``training_step``, so they
are refused at setup for a module with manual optimization (its ``training_step`` steps the optimizers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from copy import deepcopy
from itertools import chain, islice
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from lightning_sgd.batches import batch_size
from lightning_sgd.bootstrap import evaluate
from lightning_sgd.checks import check_bool, check_choice, check_float, check_int, missing_state_keys
from lightning_sgd.compat import Callback, package_of
from lightning_sgd.module_loss import ModuleLoss

__all__ = ["EMAWeights", "ema_decay"]

BN_BUFFER_MODES = ("average", "copy", "recalibrate")
#: Part of the callback's checkpoint key (what Lightning names when the checkpoint is loaded without EMAWeights).
_STATE_DICT_NOTE = ("holds the EMA (averaged) weights once the EMA has started, the raw ones are current_model_state: "
                    "resuming fit without EMAWeights would train from the averaged weights")
#: The key of the callback's state in checkpoints written before the key carried that note.
_LEGACY_STATE_KEY = "EMAWeights"
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


def _has_validation_step(module: nn.Module) -> bool:
    """Does the module override ``validation_step`` (of either Lightning package's ``LightningModule``)?"""
    return type(module).validation_step is not package_of(module).LightningModule.validation_step


def _overrides_configure_model(module: nn.Module) -> bool:
    """Does ``module`` override ``configure_model`` (of its own Lightning package's ``LightningModule``)?"""
    base = getattr(package_of(module).LightningModule, "configure_model", None)
    own = getattr(type(module), "configure_model", None)
    return own is not None and base is not None and own is not base


def _loaders(iterables: Any) -> list[Any]:
    """The DataLoaders of ``trainer.val_dataloaders`` (one, a sequence or a mapping), in Lightning's order."""
    if iterables is None:
        return []
    if isinstance(iterables, Mapping):
        return list(iterables.values())
    return list(iterables) if isinstance(iterables, (list, tuple)) else [iterables]


class EMAWeights(Callback):
    """EMA of the weights with half-life-in-samples decay, decay warmup, delayed start and BN handling.

    Works under ``pytorch_lightning.Trainer`` and ``lightning.Trainer`` (and both LightningCLIs), with any
    LightningModule; override :meth:`should_update` to choose the update steps, as with Lightning's
    ``WeightAveraging``.

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
        who = "EMAWeights"
        if decay is not None and half_life_samples is not None:
            raise ValueError("EMAWeights: give decay or half_life_samples, not both.")
        if decay is None and half_life_samples is None:
            decay = 0.999
        self.decay = check_float(who, "decay", decay, low=0.0, high=1.0, low_open=True, high_open=True,
                                 optional=True)
        self.half_life_samples = check_float(who, "half_life_samples", half_life_samples, low=0.0, low_open=True,
                                             optional=True, hint="(the half-life of the average in examples.)")
        self.warmup = check_bool(who, "warmup", warmup)
        self.warmup_gamma = check_float(who, "warmup_gamma", warmup_gamma, low=0.0, low_open=True)
        self.warmup_power = check_float(who, "warmup_power", warmup_power, low=0.0, low_open=True)
        self.update_every_n_steps = check_int(who, "update_every_n_steps", update_every_n_steps, minimum=1)
        self.start_step = check_int(who, "start_step", start_step, minimum=0)
        self.bn_buffers = check_choice(who, "bn_buffers", bn_buffers, BN_BUFFER_MODES)
        self.recalibrate_batches = check_int(who, "recalibrate_batches", recalibrate_batches, minimum=1)
        self.validate = check_choice(who, "validate", validate, VALIDATE_MODES)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"EMAWeights: device must be a string such as 'cpu' or 'cuda:0', or None, got "
                            f"{device!r} ({type(device).__name__}).")
        try:
            self.device = torch.device(device) if device is not None else None
        except RuntimeError as err:
            raise ValueError(f"EMAWeights: device={device!r} is not a device ({err}); use e.g. 'cpu', 'cuda' or "
                             "None (the model's device).") from None
        self.last_decay: float | None = None
        self._average_model: AveragedModel | None = None
        self._latest_update_step = 0  # global_step of the last update (0: none yet in this fit)
        self._pending_samples = 0.0
        self._raw_state: dict[str, Tensor] | None = None
        self._swapped = False
        self._needs_recalibration = False
        self._pairs: dict[str, list[tuple[Tensor, Tensor]]] | None = None
        self._loss: ModuleLoss | None = None

    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint. When a checkpoint is loaded by a Trainer without
        EMAWeights, Lightning warns that the callbacks of these keys should be added, so the key says what resuming
        without it would do: train from the averaged weights that ``state_dict`` holds."""
        return self._generate_state_key(state_dict=_STATE_DICT_NOTE)

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

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update the EMA after optimizer step ``step_idx`` (0-based)? Same signature as Lightning's
        ``WeightAveraging.should_update``; epochs (``epoch_idx``) never trigger an update here."""
        if step_idx is None:
            return False
        return step_idx >= self.start_step and (step_idx - self.start_step) % self.update_every_n_steps == 0

    # -------------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Per-fit state; a checkpoint restored after setup() brings its own.
        self._latest_update_step, self._pending_samples, self._raw_state = 0, 0.0, None
        self._pairs, self._swapped, self.last_decay, self._needs_recalibration = None, False, None, False
        recalibrates = self.bn_buffers == "recalibrate" and any(
            isinstance(m, _BatchNorm) and m.track_running_stats for m in pl_module.modules())
        self._loss = None
        if self.validate == "both" or recalibrates:
            who = "EMAWeights(validate='both')" if self.validate == "both" else "EMAWeights(bn_buffers='recalibrate')"
            self._loss = ModuleLoss(pl_module, who)
            self._loss.check_usable()
        if _overrides_configure_model(pl_module):  # build the layers before copying them, as WeightAveraging does
            rank_zero_warn("EMAWeights: the module overrides configure_model; it is called now to build the layers "
                           "of the EMA copy, which is not sharded, so it may run out of memory.")
            pl_module.configure_model()
        self._average_model = AveragedModel(pl_module, device=self.device or pl_module.device, use_buffers=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the first step, once the loaders are known: an EMA that can never start leaves validation and the
        # final weights raw, which the user did not ask for. A warning, not an error: short debugging runs
        # (fast_dev_run, a small max_steps) of a configuration meant for a long run are legitimate.
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.start_step >= total and self.num_updates == 0:
            rank_zero_warn(f"EMAWeights: start_step={self.start_step} is past the end of training ({int(total)} "
                           "optimizer steps): the EMA never starts, so validation and the final weights are the raw "
                           f"ones. Use start_step < {int(total)} or train longer.")
        if self.validate == "both" and (not _has_validation_step(pl_module) or trainer.limit_val_batches == 0):
            rank_zero_warn("EMAWeights(validate='both'): this fit runs no validation (the module has no "
                           "validation_step, or limit_val_batches=0), so val_ema/loss is never computed. Add a "
                           "validation_step and validation data, or use validate='ema' (the default).")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.half_life_samples is not None:
            self._pending_samples += batch_size(batch, "EMAWeights") * trainer.world_size
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            decay = ema_decay(self.num_updates, self._pending_samples, decay=self.decay,
                              half_life_samples=self.half_life_samples, warmup=self.warmup,
                              warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power)
            self._update(pl_module, decay)
            self._pending_samples = 0.0
            self._latest_update_step = trainer.global_step

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
        return {"latest_update_step": self._latest_update_step, "pending_samples": self._pending_samples,
                "last_decay": self.last_decay}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the update bookkeeping. Defaults for a state without a key: ``latest_update_step`` 0 (it only
        keeps one step from being averaged twice, and a resumed run is past every saved step), ``last_decay``
        ``None`` (informational). ``pending_samples`` (the examples since the last update, which set the next decay)
        is required with ``half_life_samples``: without it the next decay would silently be wrong."""
        required = ["pending_samples"] if self.half_life_samples is not None else []
        missing_state_keys("EMAWeights", state_dict, required, self.state_key)
        self._latest_update_step = int(state_dict.get("latest_update_step", 0))
        self._pending_samples = float(state_dict.get("pending_samples", 0.0))
        self.last_decay = state_dict.get("last_decay")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None or self.num_updates == 0:
            checkpoint["ema_weights_started"] = False  # the state_dict holds the raw weights, nothing else to store
            return
        # WeightAveraging's layout: the EMA weights as state_dict (what evaluating the checkpoint loads), the
        # module's own as current_model_state, AveragedModel's other state (n_averaged) as averaging_state.
        average_state = self._average_model.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k[len("module."):]: v for k, v in average_state.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in average_state.items() if not k.startswith("module.")}
        if self._raw_state is not None:  # after fit the module holds the EMA weights: keep the raw ones too
            checkpoint["current_model_state"] = self._raw_state

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and _LEGACY_STATE_KEY in states:  # Lightning looks up the current key only
            self.load_state_dict(states[_LEGACY_STATE_KEY])
        if trainer.state.fn != "fit" or self._average_model is None:
            return  # evaluating a checkpoint: its state_dict (the EMA weights) is what the module should hold
        if checkpoint.get("ema_weights_started") is False:
            return  # the EMA had not started; it will start as a copy at its first update
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            rank_zero_info("EMAWeights: restoring the EMA weights from the checkpoint's state_dict and the module's "
                           "own from current_model_state.")
            average_state = {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}
            self._average_model.load_state_dict({**average_state, **checkpoint["averaging_state"]})
            # the module was loaded from state_dict (the EMA weights): reload its own
            pl_module.load_state_dict(checkpoint["current_model_state"])
        else:
            rank_zero_warn("EMAWeights: the checkpoint was not saved with weight averaging; the EMA copy starts from "
                           "its state_dict, like the module.")
            self._average_model.module.load_state_dict(deepcopy(checkpoint["state_dict"]), strict=False)
        self._pairs = None

    # ---------------------------------------------------------------------------------------------------- internals
    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == "fit" and self._average_model is not None and self.num_updates > 0

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
    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        """Exchange the values of the module's and the EMA copy's parameters and buffers."""
        pairs = self._named_pairs(pl_module)
        for e, m in pairs["params"] + pairs["float_buffers"] + pairs["other_buffers"]:
            tmp = m.clone()
            m.copy_(e)
            e.copy_(tmp)

    @torch.no_grad()
    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        pairs = self._named_pairs(pl_module)
        for e, m in pairs["params"] + pairs["float_buffers"] + pairs["other_buffers"]:
            m.copy_(e)

    def _recalibrate_if_needed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recompute the EMA copy's BN running statistics on a few training batches (cumulative average).

        The forwards are the module's own ``training_step`` (through :class:`ModuleLoss`), run on ``pl_module`` with
        the EMA weights swapped in rather than on the EMA copy: the user's code then runs on the module the Trainer
        knows (``self.trainer``, ``self.device``, hooks the strategy installed). ``ModuleLoss.isolated`` mutes its
        logging, forks the RNG and restores every buffer and mode on exit, which would undo the recalibration; so
        the new BN statistics are copied out inside the block and written into the EMA copy by name after the
        weights are swapped back. Every other buffer the step touches stays restored. The batches come from a fresh
        iterator over the train DataLoader (which advances a shuffling sampler's random generator, as any extra pass
        over the loader would).
        """
        if not self._needs_recalibration or self._average_model is None:
            return
        self._needs_recalibration = False
        bns = {name: m for name, m in pl_module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
        if not bns:
            return
        assert self._loss is not None, "setup() builds the loss for a model with BatchNorm"
        momenta = {bn: bn.momentum for bn in bns.values()}
        self._swap_models(pl_module)  # pl_module now holds the EMA weights and buffers
        try:
            with self._loss.isolated(), torch.no_grad():
                pl_module.train()
                for bn in bns.values():
                    bn.reset_running_stats()
                    bn.momentum = None  # cumulative average over the batches, as update_bn does
                for batch in islice(iter(trainer.train_dataloader), self.recalibrate_batches):
                    self._loss.loss(trainer.strategy.batch_to_device(batch, pl_module.device))
                stats = {f"{name}.{key}": buffer.detach().clone()
                         for name, bn in bns.items() for key, buffer in bn.named_buffers(recurse=False)}
        finally:
            for bn, momentum in momenta.items():
                bn.momentum = momentum
            self._swap_models(pl_module)
        ema_buffers = dict(self._average_model.module.named_buffers())
        with torch.no_grad():
            for name, value in stats.items():
                ema_buffers[name].copy_(value)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Mean training loss of ``pl_module`` over the validation batches Lightning uses (each batch's mean loss
        weighted by its size), in eval mode under ``no_grad`` (:func:`lightning_sgd.bootstrap.evaluate`, the one
        module evaluator); accuracy too when the protocol gives class logits."""
        assert self._loss is not None, "setup() builds the loss for validate='both'"
        batches = chain.from_iterable(
            islice(iter(loader), None if math.isinf(limit) else int(limit))
            for loader, limit in zip(_loaders(trainer.val_dataloaders), trainer.num_val_batches))
        # (iterated inside evaluate's isolation: a loader's iterator draws its base seed from the torch RNG)
        values = evaluate(self._loss, batches, trainer.strategy.batch_to_device, allow_empty=True)
        if not values:  # no validation batch: nothing to log
            return {}
        metrics = {"loss": values["loss"]}
        if "error" in values:
            metrics["acc"] = 1.0 - values["error"]
        return metrics
