"""A progress bar that shows the run's headline measurements: B_simple (± its standard error), B_noise and λ_max.

Lightning's ``TQDMProgressBar`` with the latest values of the measurement callbacks in the trainer (any callback with
a ``b_simple`` attribute, such as :class:`~lightning_sgd.callbacks.GradientNoiseScale`, and any with a
``last_result.lambda_max``, such as :class:`~lightning_sgd.callbacks.CurvatureSpectrum`) next to the metrics the
module logs with ``prog_bar=True`` (the recipes' ``val/loss`` and ``val/acc``). ``lightning-sgd fit`` installs it
whenever the progress bar is on; in Python: ``Trainer(callbacks=[HeadlineProgressBar()])``.

A progress bar is a class of one Lightning package (each Trainer recognizes only its own package's progress bars),
so there are two: :class:`HeadlineProgressBar` (``pytorch_lightning``) and :class:`LightningHeadlineProgressBar`
(``lightning.pytorch``).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar as _LTQDMProgressBar
from pytorch_lightning.callbacks import TQDMProgressBar as _PLTQDMProgressBar


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def headline_values(callbacks: list[Any]) -> dict[str, str]:
    """``{"B_simple": "190±12", "B_noise": "86", "λ_max": "30.1"}`` from the callbacks' latest measurements (keys
    absent until measured)."""
    out: dict[str, str] = {}
    for callback in callbacks:
        for name, attr in (("B_simple", "b_simple"), ("B_noise", "b_noise")):
            value = _finite(getattr(callback, attr, None))
            if value is not None and value > 0 and getattr(callback, "measured", 1):
                se = _finite(getattr(callback, f"{attr}_se", None))
                out[name] = f"{value:.0f}" + (f"±{se:.0f}" if se is not None else "")
        result = getattr(callback, "last_result", None)
        lam = _finite(getattr(result, "lambda_max", None))
        if lam is not None:
            out["λ_max"] = f"{lam:.3g}"
    return out


class HeadlineProgressBarMixin:
    """Adds :func:`headline_values` to a Lightning progress bar's metrics (the next base class)."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        metrics.pop("v_num", None)  # the logger's version: noise next to the measurements
        return {**headline_values(trainer.callbacks), **metrics}


class HeadlineProgressBar(HeadlineProgressBarMixin, _PLTQDMProgressBar):
    """``pytorch_lightning``'s ``TQDMProgressBar`` with B_simple, B_noise and λ_max (arguments: the parent's)."""


class LightningHeadlineProgressBar(HeadlineProgressBarMixin, _LTQDMProgressBar):
    """:class:`HeadlineProgressBar` for ``lightning.pytorch`` (``import lightning as L``)."""
