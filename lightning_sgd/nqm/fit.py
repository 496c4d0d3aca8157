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
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.api import steps_to_target

__all__ = ["NQMFit", "fit_to_measurement", "read_sweep_csv"]

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
NOT_REACHED = "not reached"  # what ``lightning-sgd sweep`` writes as best_steps where no trial reached the target


class SweepCSVError(ValueError):
    """A sweep CSV that cannot be read as a steps-vs-batch-size curve: names the file, the line and what is wrong."""


def _number(path: str, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SweepCSVError(f"{path}, line {line}: {column} {text!r} is not a number.") from None
    if not math.isfinite(value) or value <= 0:
        raise SweepCSVError(f"{path}, line {line}: {column} must be finite and > 0, got {text!r}.")
    return value


def read_sweep_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(batch_size, best_steps) of the batch sizes that reached the target in a ``lightning-sgd sweep`` CSV.

    Needs the columns ``batch_size`` and ``best_steps``; with a ``reached`` column (True/False) the rows that did
    not reach the target are left out, and without one a best_steps of ``not reached`` marks them. Anything else
    is refused with a :class:`SweepCSVError` (a ValueError) naming the file and line: an empty file, a missing
    column, a row with too few or too many cells (a half-written last line), a cell that is not a number > 0.
    """
    path = check.path("path", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise SweepCSVError(f"{path}: not a text CSV ({err.reason} at byte {err.start}).") from None
    if not text.strip():
        raise SweepCSVError(f"{path}: the file is empty; expected a `lightning-sgd sweep` results CSV with columns "
                            f"batch_size, best_steps (and reached).")
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as err:
        raise SweepCSVError(f"{path}: malformed CSV ({err}).") from None
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("batch_size", "best_steps") if c not in header]
    if missing:
        raise SweepCSVError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)}); expected "
                            f"the results CSV of `lightning-sgd sweep`.")
    col = {name: header.index(name) for name in ("batch_size", "best_steps", "reached") if name in header}
    bs, steps = [], []
    for line, cells in enumerate(rows[1:], start=2):
        if not cells:  # a blank line
            continue
        if len(cells) != len(header):
            raise SweepCSVError(f"{path}, line {line}: {len(cells)} cells for {len(header)} columns "
                                f"(a truncated or half-written line?).")
        if "reached" in col:
            flag = cells[col["reached"]].strip().lower()
            if flag not in _TRUE + _FALSE:
                raise SweepCSVError(f"{path}, line {line}: reached must be True or False, got "
                                    f"{cells[col['reached']]!r}.")
            if flag in _FALSE:
                continue
        elif cells[col["best_steps"]].strip().lower() == NOT_REACHED:
            continue
        bs.append(_number(path, line, "batch_size", cells[col["batch_size"]]))
        steps.append(_number(path, line, "best_steps", cells[col["best_steps"]]))
    if not bs:
        raise SweepCSVError(f"{path}: no batch size reached the target ({len(rows) - 1} data rows); nothing to fit.")
    order = np.argsort(bs, kind="stable")
    return np.asarray(bs)[order], np.asarray(steps)[order]


@dataclass
class NQMFit:
    """S_measured(B) ≈ step_scale · S_nqm(B / batch_scale) for the measured optimizer ``reference``."""

    batch_scale: float
    step_scale: float
    rms_log_error: float  # root-mean-square error of log S over the measured points (natural log)
    reference: dict = field(default_factory=dict)  # steps_to_target kwargs of the measured optimizer
    model_kwargs: dict = field(default_factory=dict)  # target, dim, bins, ... shared by all predictions

    def predict(self, batch_size: ArrayLike, **optimizer: Any) -> np.ndarray:
        """Predicted steps at real batch sizes for ``optimizer`` (steps_to_target kwargs; default: reference)."""
        kwargs = {**self.model_kwargs, **(optimizer or self.reference)}
        kwargs.setdefault("warn_edges", False)
        bs = np.atleast_1d(check.reals("batch_size", batch_size, check.POSITIVE))
        return self.step_scale * steps_to_target(bs / self.batch_scale, **kwargs).steps

    def critical_batch_size(self, **optimizer: Any) -> float:
        """Real batch size where the predicted curve is 2× its large-batch plateau (S = 2·S_min)."""
        grid = self.batch_scale * 2.0 ** np.arange(-12, 33, 0.25)
        s = self.predict(grid, **optimizer)
        s_min = np.nanmin(s)
        return float(grid[np.argmax(s <= 2.0 * s_min)])


def fit_to_measurement(
    batch_sizes: ArrayLike,
    steps: ArrayLike,
    *,
    reference: dict | None = None,
    target: float = 0.01,
    dim: int = 10_000,
    bins: int | None = 100,
    **model_kwargs: Any,
) -> NQMFit:
    """Fit the NQM's batch and step scales to a measured curve (see the module docstring).

    Args:
        batch_sizes, steps: the measurement (e.g. :func:`read_sweep_csv` of ``lightning-sgd sweep``'s CSV), 1-D
            and of one length; batch sizes finite and > 0, steps > 0 where the target was reached and inf or NaN
            where it was not (those points are left out).
        reference: :func:`~lightning_sgd.nqm.steps_to_target` kwargs of the optimizer that was measured,
            e.g. ``{"momentum": 0.9}`` or ``{"momentum": "tune"}`` (default: plain SGD, lr tuned).
        target, dim, bins, model_kwargs: the NQM (its target sets the shape of the knee).
    """
    bs = check.reals("batch_sizes", batch_sizes, check.POSITIVE)
    s = check.reals("steps", steps, check.ANY)
    if bs.ndim != 1 or s.shape != bs.shape:
        raise ValueError(f"batch_sizes and steps must be 1-D and of one length, got shapes {bs.shape} and {s.shape}.")
    if (s <= 0).any():
        raise ValueError(f"steps must be > 0 (inf or NaN where the target was not reached), got {s[s <= 0][0]!r}.")
    if reference is not None and not isinstance(reference, dict):
        raise TypeError(f"reference must be a dict of steps_to_target kwargs or None, got {reference!r}.")
    ok = np.isfinite(s)
    bs, s = bs[ok], s[ok]
    if np.unique(bs).size < 2:
        raise ValueError(f"need measured steps at two or more batch sizes, got {bs.size} point(s) at "
                         f"{np.unique(bs).tolist()}.")
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
