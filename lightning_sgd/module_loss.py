"""The training loss of any LightningModule on any batch: the one place where measurements run the user's code.

Every measurement that needs a loss on a batch or a slice of it (the split GNS source, B_noise Hessian-vector
products, gradient-diversity probes, Hessian top-k / trace / density, EMA "both" validation, BN recalibration, the
bootstrap twin) goes through :class:`ModuleLoss`. It computes the loss one of two ways:

- **the module's own** ``training_step`` (default): called with the batch (and ``batch_idx=0`` when its signature
  takes one); it may return a Tensor or a mapping with a ``"loss"`` entry, as Lightning allows;
- **the protocol**, when the module implements ``split_batch(batch) -> (inputs, targets)``,
  ``loss(outputs, targets) -> scalar`` and the outputs: ``outputs(inputs)`` when it defines that method (for a
  module whose ``forward`` returns something else, such as an autoencoder's embedding), else ``forward(inputs)``:
  then ``loss(outputs(inputs), targets)``.
  Only the generalized Gauss-Newton needs it (the GGN needs the outputs separately from the loss); elsewhere it is a
  shortcut that skips whatever else ``training_step`` computes.

Running user code from a callback must not change training or what the user's code logs. Inside
:meth:`ModuleLoss.isolated`:

- ``self.log`` / ``self.log_dict`` are no-ops (re-running ``training_step`` would otherwise overwrite the logged
  training metrics with the measurement's);
- the RNG is forked (torch CPU and CUDA, Python's ``random``, NumPy): dropout masks drawn by a measurement are not
  drawn by training;
- every buffer (BatchNorm running statistics, counters) and every submodule's train/eval mode is restored;
- Lightning's current-hook name (``_current_fx_name``) is restored, and :func:`measuring` is True, so the
  per-example hook engine does not mistake the measurement's forward for the training step's;
- ``.grad`` is untouched: callers differentiate with ``torch.autograd.grad`` / ``torch.func``, never ``backward``.

What cannot work is refused by :meth:`ModuleLoss.check_usable` with one sentence saying why and what to change:
manual optimization (its ``training_step`` steps the optimizers itself), and a ``training_step`` that returns
nothing usable as a loss. :meth:`ModuleLoss.check_mean` tests, once, that the loss is a mean over the examples of
the batch (what every batch-size estimator assumes).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sgd.batches import batch_size, slice_batch
from lightning_sgd.compat import current_fx_name, set_current_fx_name

__all__ = ["ModuleLoss", "ProtocolRequired", "LossNotMeanError", "measuring", "has_protocol", "module_eval",
           "muted_logging", "twice_differentiable_attention", "PROTOCOL_HELP"]

_STATE = threading.local()

#: How to add the three-method protocol, quoted by every error that needs it.
PROTOCOL_HELP = (
    "add two methods to the LightningModule: `split_batch(batch) -> (inputs, targets)` and "
    "`loss(outputs, targets) -> scalar mean loss`, where the outputs are what `forward(inputs)` returns (e.g. "
    "logits); if your `forward` returns something else (an autoencoder's embedding), also add "
    "`outputs(inputs) -> outputs` (e.g. the reconstruction) and keep `forward` as it is; see README section "
    "'Use it with your own LightningModule'"
)


class ProtocolRequired(TypeError):
    """A feature needs ``split_batch``/``forward``/``loss`` and the module does not implement them."""


class LossNotMeanError(ValueError):
    """The training loss is not a mean over the examples of the batch (:meth:`ModuleLoss.check_mean`)."""


def measuring() -> bool:
    """True while a measurement runs the module's code (inside :meth:`ModuleLoss.isolated`)."""
    return getattr(_STATE, "depth", 0) > 0


def has_protocol(module: nn.Module) -> bool:
    """Does ``module`` implement ``split_batch``, ``loss`` and its outputs (``outputs`` or an own ``forward``)?"""
    has_outputs = callable(getattr(module, "outputs", None)) or type(module).forward is not nn.Module.forward
    return has_outputs and all(callable(getattr(module, name, None)) for name in ("split_batch", "loss"))


def _network_outputs(module: nn.Module, inputs: Any) -> Any:
    """The outputs the protocol's ``loss`` compares with the targets: ``module.outputs(inputs)`` if defined, else
    ``module(inputs)``."""
    method = getattr(module, "outputs", None)
    return method(inputs) if callable(method) else module(inputs)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _LossAsForward(nn.Module):
    """``forward(batch)`` = the module's loss on ``batch``, so ``functional_call`` can substitute its parameters."""

    def __init__(self, owner: ModuleLoss) -> None:
        super().__init__()
        self.module = owner.module
        self._owner = [owner]  # a list: not registered as a submodule

    def forward(self, batch: Any) -> Tensor:
        return self._owner[0].loss(batch, _functional=True)


class _OutputsAsForward(nn.Module):
    """``forward(inputs)`` = the protocol's network outputs, so ``functional_call`` can substitute parameters."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: Any) -> Any:
        return _network_outputs(self.module, inputs)


class ModuleLoss:
    """The scalar training loss of ``module`` on a batch, computed safely from a callback.

    Args:
        module: the LightningModule (or any ``nn.Module`` with ``training_step`` or the protocol).
        who: the feature asking, named in error messages (``"GradientNoiseScale"``).
        use_protocol: ``None`` (default): the protocol when the module implements it, else ``training_step``;
            ``True``: require the protocol; ``False``: always ``training_step``.
    """

    def __init__(self, module: nn.Module, who: str, use_protocol: bool | None = None) -> None:
        self.module = module
        self.who = who
        protocol = has_protocol(module)
        if use_protocol is True and not protocol:
            raise self.protocol_error("needs the network's outputs separately from the loss")
        self.uses_protocol = protocol if use_protocol is None else bool(use_protocol and protocol)
        if not self.uses_protocol and not callable(getattr(module, "training_step", None)):
            raise TypeError(f"{who}: {type(module).__name__} has no `training_step` to compute the loss with; "
                            f"implement it (as Lightning requires), or {PROTOCOL_HELP}.")
        self._step_takes_index = False
        if not self.uses_protocol:
            try:
                params = inspect.signature(module.training_step).parameters
                positional = [p for p in params.values()
                              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
                self._step_takes_index = "batch_idx" in params or len(positional) >= 2 or any(
                    p.kind == p.VAR_POSITIONAL for p in positional)
            except (TypeError, ValueError):  # no signature (a C function): pass the index as Lightning does
                self._step_takes_index = True
        self._mean_checked = False

    # ------------------------------------------------------------------------------------------------ checks
    def protocol_error(self, why: str) -> ProtocolRequired:
        """The error for a feature that needs the protocol: names the feature, why, and the smallest change."""
        return ProtocolRequired(f"{self.who} {why}, which `training_step` does not expose: {PROTOCOL_HELP}.")

    def check_usable(self) -> None:
        """Raise, at setup, when the module's code cannot serve as a loss here."""
        if not self.uses_protocol and not getattr(self.module, "automatic_optimization", True):
            raise ValueError(
                f"{self.who}: {type(self.module).__name__} uses manual optimization (automatic_optimization=False), "
                "so its `training_step` steps the optimizers itself and cannot be re-run as a loss by a measurement "
                f"(e.g. a GAN toggling two optimizers). Remove {self.who} from this Trainer, or {PROTOCOL_HELP} "
                "for the network and loss to be measured.")

    # ------------------------------------------------------------------------------------------------- losses
    def loss(self, batch: Any, _functional: bool = False) -> Tensor:
        """The scalar loss on ``batch`` (call inside :meth:`isolated`)."""
        module = self.module
        if self.uses_protocol:
            inputs, targets = module.split_batch(batch)  # type: ignore[operator]
            return module.loss(_network_outputs(module, inputs), targets)  # type: ignore[operator]
        out = module.training_step(batch, 0) if self._step_takes_index else module.training_step(batch)
        if isinstance(out, Mapping):
            out = out.get("loss")
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(
                f"{self.who}: `training_step` returned {type(out).__name__ if out is not None else 'None'} for a "
                "measurement batch; it must return the loss as a scalar Tensor or as {'loss': tensor}, as Lightning "
                "requires for automatic optimization.")
        if not _functional and not out.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{self.who}: the loss `training_step` returned does not depend on the parameters "
                             "(detached, or computed under torch.no_grad()).")
        return out.reshape(())

    def functional_loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        """The loss with the module's parameters replaced by ``params`` (names as in ``named_parameters()``), for
        ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``)."""
        wrapper = _LossAsForward(self)
        return functional_call(wrapper, {f"module.{k}": v for k, v in params.items()}, (batch,), strict=False)

    def outputs(self, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` of the protocol (GGN); :class:`ProtocolRequired` without it."""
        if not self.uses_protocol:
            raise self.protocol_error("needs the network's outputs separately from the loss")
        inputs, targets = self.module.split_batch(batch)  # type: ignore[operator]
        return _network_outputs(self.module, inputs), targets

    def functional_outputs(self, params: Mapping[str, Tensor], inputs: Any) -> Any:
        """The protocol's network outputs on ``inputs`` with the parameters replaced by ``params`` (GGN's Jacobian
        products); :class:`ProtocolRequired` without the protocol."""
        if not self.uses_protocol:
            raise self.protocol_error("needs the network's outputs separately from the loss")
        wrapper = _OutputsAsForward(self.module)
        return functional_call(wrapper, {f"module.{k}": v for k, v in params.items()}, (inputs,), strict=False)

    def check_mean(self, batch: Any, rtol: float = 1e-3) -> None:
        """Raise ``ValueError`` unless the loss of ``batch`` is the mean of the losses of its two halves, weighted by
        their sizes (what "a mean over examples" means; checked once, in eval mode so dropout and BatchNorm's batch
        statistics do not couple the halves). A sum over examples is named as such. A non-finite loss leaves the check
        for a later batch. Raises :class:`LossNotMeanError` (a ``ValueError``)."""
        if self._mean_checked:
            return
        n = batch_size(batch, self.who)
        if n < 2:
            return
        half = n // 2
        with self.isolated(), module_eval(self.module), torch.no_grad():
            full = float(self.loss(batch))
            first = float(self.loss(slice_batch(batch, slice(0, half), self.who)))
            second = float(self.loss(slice_batch(batch, slice(half, n), self.who)))
        if not all(math.isfinite(v) for v in (full, first, second)):
            return  # nothing to judge on this batch (a NaN/inf loss); checked again on the next one
        mean = (half * first + (n - half) * second) / n
        scale = max(abs(full), abs(mean), 1e-12)
        if abs(full - mean) <= rtol * scale:
            self._mean_checked = True
            return
        if abs(full - (first + second)) <= rtol * max(abs(full), 1e-12):
            kind = "a sum over examples"
        else:
            kind = "neither a mean nor a sum over examples"
        raise LossNotMeanError(
            f"{self.who}: the training loss is {kind} (loss of {n} examples {full:.6g}, size-weighted mean of its two "
            f"halves {mean:.6g}); batch-size estimators need the mean over examples. Use reduction='mean' (and, for "
            "token losses, the same number of tokens per example), or divide the loss by the batch size.")

    # ---------------------------------------------------------------------------------------------- isolation
    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Run the module's code with logging muted, the RNG forked, buffers, modes and Lightning's hook state
        restored, and gradients enabled (see the module docstring)."""
        module = self.module
        devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        modes = [(sub, sub.training) for sub in module.modules()]
        fx_name = current_fx_name(module)
        py_state = random.getstate()
        np_state = _numpy_state()
        _STATE.depth = getattr(_STATE, "depth", 0) + 1
        try:
            with muted_logging(module), torch.random.fork_rng(devices=devices), torch.enable_grad():
                yield
        finally:
            _STATE.depth -= 1
            with torch.no_grad():
                for buffer, copy in buffers:
                    if buffer.shape == copy.shape:
                        buffer.copy_(copy)
            for sub, mode in modes:
                sub.training = mode
            set_current_fx_name(module, fx_name)
            random.setstate(py_state)
            _set_numpy_state(np_state)


@contextlib.contextmanager
def muted_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block (instance attributes shadow the methods);
    whatever the instance had before (a user's own override) is put back after."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.log, module.log_dict = _noop, _noop
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                setattr(module, name, saved[name])
            else:
                module.__dict__.pop(name, None)


@contextlib.contextmanager
def module_eval(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block (dropout off, BatchNorm on running statistics); each one's mode
    restored after."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def twice_differentiable_attention() -> Any:
    """A context in which ``F.scaled_dot_product_attention`` (and ``nn.MultiheadAttention`` through it) uses its math
    kernel only: the fused kernels' backward is not differentiable, so double backward (Hessian-vector products)
    and forward-mode AD through them fail ("derivative for ..._flash_attention_..._backward is not implemented")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return np.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)
