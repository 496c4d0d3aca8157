"""Batch-size sweeps: steps to a target metric vs batch size with tuned hyper-parameters (Shallue et al. 2019).

``lightning-sgd sweep`` (:mod:`lightning_sgd.sweep.cli`) runs, for each batch size, a quasi-random search (Optuna's
Sobol QMC sampler) over the learning rate and other hyper-parameters of a recipe; each trial stops at the first
evaluation that reaches the target. Trials live in an Optuna RDB storage (SQLite by default, PostgreSQL to share a
sweep between workers), so a killed sweep resumes where it stopped. Results: a table of best steps per batch size,
the fit S(B) = S_min (1 + B_noise/B), and plots.

Python use::

    from lightning_sgd.sweep import SweepConfig, SearchParam, run_sweep
    summary = run_sweep(SweepConfig(recipe="recipes/mnist1d.yaml", batch_sizes=[32, 128], target=0.8))
"""

from lightning_sgd._extras import require
from lightning_sgd._lazy import lazy_exports

require("optuna", "lightning-sgd sweep (lightning_sgd.sweep)")  # the whole sweep stores its trials in Optuna

_EXPORTS = {
    "SearchParam": "config",
    "SweepConfig": "config",
    "SweepConfigError": "config",
    "run_sweep": "runner",
    "run_trial": "runner",
    "TargetStopper": "runner",
    "summarize": "results",
    "plot_sweep": "plots",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
