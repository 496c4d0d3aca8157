"""Both Lightning packages: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning as L``).

The two packages ship the same classes twice, and each Trainer accepts only its own package's ``Callback``,
``Strategy`` and ``LightningModule`` subclasses (``isinstance`` checks in the Trainer and in LightningCLI's
``class_path`` validation). Our callbacks therefore derive from :class:`Callback` below, which subclasses *both*
packages' ``Callback`` (the two are plain classes with the same hook names and no state), so one class works under
either Trainer and either LightningCLI, with no different import for the user.

Anything else that differs by package (the strategy, ``WeightAveraging``, logger classes) is looked up through
:func:`package_of`, which tells which package a Trainer or module comes from. Our strategy names
(``"ddp_grad_stats"``) are registered in both packages' ``StrategyRegistry`` when this module is imported.

**Lightning's private API lives here and nowhere else.** A few features need state Lightning keeps in underscored
attributes (the fit loop's data fetcher, DDP's comm-hook settings, the name of the hook a module is running). Each
access is one function below with a comment saying what it relies on, so a Lightning release that moves one breaks
one function, which the Lightning-facing tests (``make test-newest-lightning``) catch. The supported range is
bounded in ``pyproject.toml``. The one private *method* we override, ``DDPStrategy._register_ddp_hooks``, is named
by :data:`DDP_REGISTER_HOOKS` and overridden in :mod:`lightning_sgd.plugins.grad_stats_ddp`.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import pytorch_lightning as _pl
from pytorch_lightning.callbacks import Callback as _PLCallback

try:  # the unified package is optional: users of pytorch_lightning alone need not install it
    import lightning.pytorch as _lpt
    from lightning.pytorch.callbacks import Callback as _LCallback
except ImportError:  # pragma: no cover - both are installed by the project's set-up
    _lpt = None
    _LCallback = None

__all__ = ["DDP_REGISTER_HOOKS", "Callback", "PACKAGES", "STRATEGIES", "current_fx_name", "ddp_comm_settings",
           "ddp_kwargs", "package_of", "register_strategies", "replace_train_dataloader", "restart_train_fetcher",
           "set_current_fx_name", "train_dataloaders", "train_fetcher"]

#: The Lightning packages importable here, ``pytorch_lightning`` first.
PACKAGES: tuple[ModuleType, ...] = (_pl,) if _lpt is None else (_pl, _lpt)

if _LCallback is None:  # pragma: no cover
    Callback = _PLCallback
else:

    class Callback(_PLCallback, _LCallback):  # type: ignore[misc,valid-type]
        """A ``Callback`` of both Lightning packages: accepted by ``pytorch_lightning.Trainer`` and by
        ``lightning.Trainer`` (and by both packages' LightningCLI)."""


def package_of(obj: Any) -> ModuleType:
    """The Lightning package (``pytorch_lightning`` or ``lightning.pytorch``) a Trainer, LightningModule, Callback or
    Strategy instance belongs to; ``pytorch_lightning`` when it cannot tell."""
    for cls in type(obj).__mro__:
        module = cls.__module__ or ""
        if module.startswith("lightning.pytorch"):
            return _lpt if _lpt is not None else _pl
        if module.startswith("pytorch_lightning"):
            return _pl
    return _pl


def import_from(package: ModuleType, path: str) -> Any:
    """``path`` (``"callbacks.WeightAveraging"``) looked up in ``package`` (one of :data:`PACKAGES`)."""
    module_name, _, attr = path.rpartition(".")
    module = importlib.import_module(f"{package.__name__}.{module_name}") if module_name else package
    return getattr(module, attr)


#: Strategy names registered in every package's ``StrategyRegistry``: name -> (description, ``module:function``
#: taking the package's name and the strategy's arguments and returning that package's strategy object).
STRATEGIES: dict[str, tuple[str, str]] = {
    "ddp_grad_stats": ("DDP that also records local (per-rank) and global gradient norms (lightning-sgd)",
                       "lightning_sgd.plugins.grad_stats_ddp:grad_stats_ddp_strategy"),
}


def _build_strategy(target: str, package_name: str, **init_params: Any) -> Any:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)(package_name, **init_params)


def register_strategies() -> None:
    """Register :data:`STRATEGIES` in both packages' ``StrategyRegistry``, so ``Trainer(strategy="ddp_grad_stats")``
    (and ``trainer.strategy: ddp_grad_stats`` in LightningCLI YAML) works under either package.

    Runs when this module is imported, i.e. as soon as any ``lightning_sgd`` callback or plugin is; the strategy's
    module itself is imported only when a Trainer asks for the name. Names already registered are left alone.
    """
    for package in PACKAGES:
        registry = import_from(package, "strategies.StrategyRegistry")
        for name, (description, target) in STRATEGIES.items():
            if name not in registry:
                registry.register(name, functools.partial(_build_strategy, target, package.__name__),
                                  description=description)


register_strategies()


# ---------------------------------------------------------------------------------- Lightning's private API (2.6)
def current_fx_name(module: Any) -> str | None:
    """The Lightning hook ``module`` is running (``"training_step"``, ``"validation_step"``, ...), ``None`` outside
    one. Relies on ``LightningModule._current_fx_name``, which the Trainer sets around every hook call (``call.py``)
    and ``self.log`` reads to pick the logging rules."""
    return getattr(module, "_current_fx_name", None)


def set_current_fx_name(module: Any, name: str | None) -> None:
    """Put back what :func:`current_fx_name` read (after running the module's code from inside another hook, so
    ``self.log`` keeps applying the right hook's rules). Only on a LightningModule (which has the attribute)."""
    if hasattr(module, "_current_fx_name"):
        module._current_fx_name = name


def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The keyword arguments a DDP strategy passes to ``DistributedDataParallel`` (``gradient_as_bucket_view``, ...).
    Relies on ``DDPStrategy._ddp_kwargs`` (set from the strategy's ``**kwargs``); ``{}`` for other strategies."""
    return dict(getattr(strategy, "_ddp_kwargs", None) or {})


#: The ``DDPStrategy`` method that registers the DDP communication hook after the model is wrapped (called from
#: ``configure_ddp``); :class:`lightning_sgd.plugins.GradStatsDDPStrategy` overrides it to wrap the user's hook.
DDP_REGISTER_HOOKS = "_register_ddp_hooks"


def ddp_comm_settings(strategy: Any) -> tuple[Any, Any, Any]:
    """``(ddp_comm_hook, ddp_comm_state, ddp_comm_wrapper)`` the user gave a ``DDPStrategy``. Relies on the
    attributes ``_ddp_comm_hook``, ``_ddp_comm_state``, ``_ddp_comm_wrapper`` that ``DDPStrategy.__init__`` stores
    them in (``None`` when not given)."""
    return (getattr(strategy, "_ddp_comm_hook", None), getattr(strategy, "_ddp_comm_state", None),
            getattr(strategy, "_ddp_comm_wrapper", None))


def train_dataloaders(trainer: Any) -> list[Any]:
    """The train DataLoaders the fit loop iterates, after Lightning processed them (its ``DistributedSampler``
    injected under DDP). Relies on ``FitLoop._combined_loader`` (a ``CombinedLoader``, built in ``setup_data``) and
    its ``flattened`` list; ``[]`` before the fit loop has set up its data."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return [] if combined is None else list(combined.flattened)


def replace_train_dataloader(trainer: Any, loader: Any) -> None:
    """Make the fit loop iterate ``loader`` instead of its single train DataLoader (from the next iterator it makes:
    see :func:`restart_train_fetcher`). Relies on ``CombinedLoader.flattened`` being settable, as Lightning's own
    ``_reset_progress``/``_update_dataloader`` paths do."""
    trainer.fit_loop._combined_loader.flattened = [loader]


def train_fetcher(trainer: Any) -> Any:
    """The fit loop's data fetcher (``None`` before ``setup_data``). Relies on ``FitLoop._data_fetcher``, whose
    ``length`` is the epoch's batch count the fetcher uses to flag the last batch."""
    return getattr(trainer.fit_loop, "_data_fetcher", None)


def restart_train_fetcher(trainer: Any) -> None:
    """Re-point the fit loop's fetcher at its (replaced) combined loader and make the epoch's iterator again, as
    ``FitLoop.setup_data``/``on_advance_start`` do. Relies on ``_DataFetcher.setup(combined_loader)`` + ``iter()``."""
    fetcher = train_fetcher(trainer)
    if fetcher is not None:
        fetcher.setup(trainer.fit_loop._combined_loader)
        iter(fetcher)
