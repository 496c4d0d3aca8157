"""Noisy quadratic model (Zhang et al. 2019): exact expected-risk dynamics and batch-size predictions.

>>> from lightning_sgd.nqm import steps_to_target, lower_bound_steps
>>> r = steps_to_target([16, 4096], momentum="tune")   # tuned lr and β per batch size, exact risk
>>> r.steps, r.lr, r.momentum                           # doctest: +SKIP

Modules: :mod:`~lightning_sgd.nqm.core` (closed-form risk), :mod:`~lightning_sgd.nqm.search` (steps to target
over hyper-parameter grids), :mod:`~lightning_sgd.nqm.models` (NQM and the interpolation model),
:mod:`~lightning_sgd.nqm.schedules` (schedules, optimized piecewise-constant LR), :mod:`~lightning_sgd.nqm.fit`
(fit to a measured steps-vs-batch curve), :mod:`~lightning_sgd.nqm.figures` (the paper's figures).
"""

from lightning_sgd.nqm.api import (
    StepsResult,
    default_ema_grid,
    default_lr_grid,
    default_momentum_grid,
    lower_bound_steps,
    make_model,
    optimal_lr,
    risk,
    steps_to_target,
)
from lightning_sgd.nqm.core import Spectrum, expected_risk, make_spectrum, simulate_schedule, steady_state_risk
from lightning_sgd.nqm.fit import NQMFit, fit_to_measurement, read_sweep_csv
from lightning_sgd.nqm.models import NQM, InterpolationModel
from lightning_sgd.nqm.schedules import (
    PiecewiseResult,
    constant,
    linear_decay,
    optimize_piecewise_constant,
    piecewise_constant,
)

__all__ = [
    "NQM",
    "InterpolationModel",
    "Spectrum",
    "StepsResult",
    "NQMFit",
    "PiecewiseResult",
    "steps_to_target",
    "optimal_lr",
    "lower_bound_steps",
    "risk",
    "make_model",
    "make_spectrum",
    "expected_risk",
    "steady_state_risk",
    "simulate_schedule",
    "default_lr_grid",
    "default_momentum_grid",
    "default_ema_grid",
    "constant",
    "linear_decay",
    "piecewise_constant",
    "optimize_piecewise_constant",
    "fit_to_measurement",
    "read_sweep_csv",
]
