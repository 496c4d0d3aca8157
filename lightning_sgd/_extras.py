"""Optional dependencies: the callbacks and plugins need only torch, Lightning, NumPy, SciPy and
hessian-eigenthings; the sweep, the recipes' data, the plots and LARS/LAMB need more, installed as extras
(``pip install 'lightning-sgd[sweep]'``, ``[recipes]``, ``[plots]``, ``[optimizers]``, or ``[all]``).

:func:`require` imports such a dependency where it is used and, when it is missing, raises an ``ImportError`` that
names the feature and the extra that provides it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level import name -> (distribution name, extra that installs it). Keep in step with pyproject.toml.
EXTRAS: dict[str, tuple[str, str]] = {
    "optuna": ("optuna", "sweep"),
    "matplotlib": ("matplotlib", "plots"),
    "mnist1d": ("mnist1d", "recipes"),
    "PIL": ("pillow", "recipes"),
    "pytorch_optimizer": ("pytorch-optimizer", "optimizers"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"mnist1d.data"``) for ``feature`` (a few words: "the MNIST-1D recipes"), or raise
    :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if top not in EXTRAS or (error.name is not None and error.name.split(".")[0] != top):
            raise  # not one of ours, or the package is there and something inside it failed: show the real error
        distribution, extra = EXTRAS[top]
        raise MissingExtraError(
            f"{feature} needs the package {distribution!r}, which is not installed: pip install "
            f"'lightning-sgd[{extra}]' (or 'lightning-sgd[all]').", name=top) from error
