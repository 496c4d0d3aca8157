"""Both Lightning packages: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning as L``).

The two packages ship the same classes twice, and each Trainer accepts only its own package's ``Callback``,
``Strategy`` and ``LightningModule`` subclasses (``isinstance`` checks in the Trainer and in LightningCLI's
``class_path`` validation). Our callbacks therefore derive from :class:`Callback` below, which subclasses *both*
packages' ``Callback`` (the two are plain classes with the same hook names and no state), so one class works under
either Trainer and either LightningCLI, with no different import for the user.

Anything else that differs by package (the strategy, ``WeightAveraging``, logger classes) is looked up through
:func:`package_of`, which tells which package a Trainer or module comes from. Our strategy names
(``"ddp_grad_stats"``) are registered in both packages' ``StrategyRegistry`` when this module is imported.
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

__all__ = ["Callback", "PACKAGES", "STRATEGIES", "package_of",
           "register_strategies"]

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
