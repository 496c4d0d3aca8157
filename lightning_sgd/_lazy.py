"""Lazy re-exports: ``from lightning_sgd.callbacks import X`` imports only the module that defines ``X``.

Keeps ``import lightning_sgd.callbacks`` cheap (no optuna/wandb/hessian-eigenthings import until used) while the
package still lists every public name in ``__all__`` and LightningCLI can resolve ``class_path`` values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for a package whose names live in submodules.

    ``exports`` maps a public name to the submodule (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_name}"), name)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
