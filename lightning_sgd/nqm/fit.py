"""Fit the NQM to a measured steps-vs-batch-size curve and predict the curve for other optimizers.

A real problem and the NQM need not share units: the model's batch size B_nqm relates to the real one by the
ratio of their gradient-noise scales, and one NQM step may be worth several real ones. So the measured curve
S(B) is modelled as

    S(B) = step_scale · S_nqm(B / batch_scale)

with S_nqm the NQM's tuned steps to its target for the optimizer that was measured (plain SGD unless told
otherwise). Both scales are fitted by least squares on log S (``batch_scale`` by a 1-D search, ``step_scale``
then in closed form). ``predict`` maps the NQM's steps for any other optimizer (momentum, preconditioning P = H^p,
EMA) back through the same two scales: the NQM's prediction of how that optimizer would scale on your problem.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar

from lightning_sgd.nqm.api import steps_to_target

__all__ = ["NQMFit", "fit_to_measurement", "read_sweep_csv"]


def read_sweep_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(batch_size, best_steps) of the batch sizes that reached the target in a ``lightning-sgd sweep`` CSV."""
    bs, steps = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if str(row.get("reached", "True")).strip().lower() in ("false", "0", "no"):
                continue
            try:
                b, s = float(row["batch_size"]), float(row["best_steps"])
            except (KeyError, ValueError):
                continue
            if np.isfinite(s) and s > 0:
                bs.append(b)
                steps.append(s)
    if not bs:
        raise ValueError(f"{path}: no rows with numeric batch_size and best_steps (columns of `lightning-sgd sweep`)")
    order = np.argsort(bs)
    return np.asarray(bs)[order], np.asarray(steps)[order]


@dataclass
class NQMFit:
    """S_measured(B) ≈ step_scale · S_nqm(B / batch_scale) for the measured optimizer ``reference``."""

    batch_scale: float
    step_scale: float
    rms_log_error: float  # root-mean-square error of log S over the measured points (natural log)
    reference: dict = field(default_factory=dict)  # steps_to_target kwargs of the measured optimizer
    model_kwargs: dict = field(default_factory=dict)  # target, dim, bins, ... shared by all predictions

    def predict(self, batch_size, **optimizer) -> np.ndarray:
        """Predicted steps at real batch sizes for ``optimizer`` (steps_to_target kwargs; default: reference)."""
        kwargs = {**self.model_kwargs, **(optimizer or self.reference)}
        kwargs.setdefault("warn_edges", False)
        bs = np.atleast_1d(np.asarray(batch_size, float))
        return self.step_scale * steps_to_target(bs / self.batch_scale, **kwargs).steps

    def critical_batch_size(self, **optimizer) -> float:
        """Real batch size where the predicted curve is 2× its large-batch plateau (S = 2·S_min)."""
        grid = self.batch_scale * 2.0 ** np.arange(-12, 33, 0.25)
        s = self.predict(grid, **optimizer)
        s_min = np.nanmin(s)
        return float(grid[np.argmax(s <= 2.0 * s_min)])


def fit_to_measurement(
    batch_sizes,
    steps,
    *,
    reference: dict | None = None,
    target: float = 0.01,
    dim: int = 10_000,
    bins: int | None = 100,
    **model_kwargs,
) -> NQMFit:
    """Fit the NQM's batch and step scales to a measured curve (see the module docstring).

    Args:
        batch_sizes, steps: the measurement (e.g. :func:`read_sweep_csv` of ``lightning-sgd sweep``'s CSV).
        reference: :func:`~lightning_sgd.nqm.steps_to_target` kwargs of the optimizer that was measured,
            e.g. ``{"momentum": 0.9}`` or ``{"momentum": "tune"}`` (default: plain SGD, lr tuned).
        target, dim, bins, model_kwargs: the NQM (its target sets the shape of the knee).
    """
    bs = np.asarray(batch_sizes, float)
    s = np.asarray(steps, float)
    ok = np.isfinite(s) & (s > 0) & (bs > 0)
    bs, s = bs[ok], s[ok]
    if bs.size < 2:
        raise ValueError("need at least two measured (batch_size, steps) points")
    reference = dict(reference or {})
    shared = {"target": target, "dim": dim, "bins": bins, **model_kwargs}
    # the model curve on a dense grid of NQM batch sizes, interpolated in log-log
    grid = 2.0 ** np.arange(-16.0, 36.01, 0.25)
    curve = steps_to_target(grid, warn_edges=False, **shared, **reference).steps
    good = np.isfinite(curve)
    lg, lc = np.log(grid[good]), np.log(curve[good])
    ls, lb = np.log(s), np.log(bs)

    def sse(log_scale: float) -> float:
        x = lb - log_scale
        if x.min() < lg[0] or x.max() > lg[-1]:
            return np.inf
        r = ls - np.interp(x, lg, lc)
        return float(np.sum((r - r.mean()) ** 2))

    candidates = np.arange(lb.max() - lg[-1], lb.min() - lg[0], 0.05)
    errs = np.array([sse(c) for c in candidates])
    c0 = candidates[int(np.argmin(errs))]
    res = minimize_scalar(sse, bounds=(c0 - 0.1, c0 + 0.1), method="bounded")
    log_scale = float(res.x) if res.fun <= errs.min() else float(c0)
    r = ls - np.interp(lb - log_scale, lg, lc)
    return NQMFit(
        batch_scale=float(np.exp(log_scale)),
        step_scale=float(np.exp(r.mean())),
        rms_log_error=float(np.sqrt(np.mean((r - r.mean()) ** 2))),
        reference=reference,
        model_kwargs=shared,
    )
