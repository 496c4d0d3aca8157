"""Public functions: steps to a target risk with tuned hyper-parameters, optimal LR, lower bound, risk."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.models import NQM, InterpolationModel
from lightning_sgd.nqm.search import check_target

__all__ = [
    "StepsResult",
    "steps_to_target",
    "optimal_lr",
    "lower_bound_steps",
    "risk",
    "make_model",
    "default_lr_grid",
    "default_momentum_grid",
    "default_ema_grid",
]

Tunable = float | str | np.ndarray | list | None


def make_model(model: str | NQM | InterpolationModel | None = None, *, dim: int = 10_000, bins: int | None = 100,
               **kwargs: Any) -> NQM | InterpolationModel:
    """``"nqm"`` (default) or ``"interpolation"``, or pass a model instance through (then without model kwargs)."""
    if model is None or model == "nqm":
        return NQM(dim, bins, **kwargs)
    if model == "interpolation":
        return InterpolationModel(dim, bins, **kwargs)
    if isinstance(model, (NQM, InterpolationModel)):
        if kwargs:
            raise ValueError(f"model is an instance, so {sorted(kwargs)} would be ignored: set them when building "
                             f"it, or pass model='nqm'/'interpolation'.")
        check.integer("dim", dim)
        check.optional_integer("bins", bins)
        return model
    raise ValueError(f"unknown model {model!r}: use 'nqm', 'interpolation' or an NQM/InterpolationModel")


def default_lr_grid(max_curvature: float, *, kind: str = "sgd", n: int | None = None) -> np.ndarray:
    """Log-spaced learning rates: α h̃₁ ∈ [1e-7, 2) for SGD/EMA (2/h̃₁ is the stability limit), and effective
    rates α/(1 − β) ∈ [1e-7, 4000)/h̃₁ for momentum (stable up to 2(1 + β)/(1 − β))."""
    max_curvature = check.real("max_curvature", max_curvature, check.POSITIVE)
    check.choice("kind", kind, ("sgd", "momentum", "ema"))
    n = check.optional_integer("n", n)
    if kind == "momentum":
        n = n or 300
        return np.logspace(-7, np.log10(4000.0), n) / max_curvature
    n = n or 200
    return np.logspace(-7, np.log10(1.999), n) / max_curvature


def default_momentum_grid(n: int = 24) -> np.ndarray:
    """β with 1 − β log-spaced in [1e-4, 1] (β = 0, plain SGD, included)."""
    check.integer("n", n)
    return 1.0 - np.logspace(0, -4, n)


def default_ema_grid(n: int = 28) -> np.ndarray:
    """γ with 1 − γ log-spaced in [1e-7, 1] (γ = 0, no averaging, included)."""
    check.integer("n", n)
    return 1.0 - np.logspace(0, -7, n)


@dataclass
class StepsResult:
    """Minimal steps to the target per batch size and the hyper-parameters that achieve it."""

    batch_size: np.ndarray
    steps: np.ndarray  # inf where the target is never reached on the grid
    lr: np.ndarray
    momentum: np.ndarray | None = None
    ema: np.ndarray | None = None
    effective_lr: np.ndarray = field(default=None)  # α/(1 − β) for momentum, else α
    at_grid_edge: np.ndarray = field(default=None)  # argmin on the edge of a tuned grid (widen it)

    def __post_init__(self) -> None:
        if self.effective_lr is None:
            self.effective_lr = self.lr if self.momentum is None else self.lr / (1.0 - self.momentum)

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {"batch_size": self.batch_size, "steps": self.steps, "lr": self.lr, "effective_lr": self.effective_lr}
        if self.momentum is not None:
            out["momentum"] = self.momentum
        if self.ema is not None:
            out["ema"] = self.ema
        return out


def _grid(value: Tunable, default: np.ndarray) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value != "tune":
            raise ValueError(f"expected a number, an array of values to tune over, None or 'tune'; got {value!r}")
        return default
    return np.atleast_1d(np.asarray(value, float))


def _spacing(values: np.ndarray) -> float:
    """The largest ratio between neighbouring values of a positive grid (its resolution on a log scale)."""
    v = np.sort(np.asarray(values, float))
    v = v[v > 0]
    return float(np.max(v[1:] / v[:-1])) if v.size > 1 else 1.0


def steps_to_target(
    batch_size: ArrayLike,
    *,
    optimizer: str = "sgd",
    precondition_power: float = 0.0,
    momentum: Tunable = None,
    ema: Tunable = None,
    lr: Tunable = "tune",
    target: float = 0.01,
    dim: int = 10_000,
    bins: int | None = 100,
    model: str | NQM | InterpolationModel | None = None,
    exhaustive: bool = False,
    warn_edges: bool = True,
    refine: bool = True,
    **model_kwargs: Any,
) -> StepsResult:
    """Fewest steps to reach expected risk ``target`` at each batch size, minimised over the hyper-parameters.

    Every argument is checked before any search (TypeError/ValueError naming it).

    Args:
        batch_size: scalar or array of batch sizes, finite and > 0 (the NQM's B divides its gradient noise, so a
            fractional B is a model batch size as good as any: the fit of :mod:`~lightning_sgd.nqm.fit` uses them).
        optimizer: ``"sgd"``, ``"momentum"`` (same as ``momentum="tune"``) or ``"ema"`` (``ema="tune"``).
        precondition_power: p ∈ [0, 1] of the preconditioner P = H^p (0 = SGD, 1 = Newton; Adam-like ≈ 0.5).
        momentum: heavy-ball β ∈ [0, 1): None (not used), a number (fixed), an array (grid) or ``"tune"``
            (:func:`default_momentum_grid`). The lr grid is then a grid of effective rates α/(1 − β).
        ema: EMA coefficient γ ∈ [0, 1) of the iterates (eq. 11): None, a number, an array or ``"tune"``.
        lr: ``"tune"`` (:func:`default_lr_grid`, ≥ 200 values), a number > 0 (fixed) or an array (grid).
        target: the risk threshold (paper: 0.01), > 0 and below the model's initial risk.
        dim, bins, model_kwargs: the model (default the paper's NQM; ``model="interpolation"`` for the
            stochastic-linear-regression counterpart).
        exhaustive: check every grid point (exact grid minimum) instead of the coarse-to-fine search.
        refine: then refine the grid optimum to the continuous one (:func:`lightning_sgd.nqm.search.refine`:
            golden-section on log α and on log(1 − β) / log(1 − γ) where tuned, within one grid step and inside the
            grid's range), so the steps do not depend on the grid's spacing (NQM only; the interpolation model
            keeps the grid optimum). The returned ``lr``/``momentum``/``ema`` are then the refined values.

    Returns:
        :class:`StepsResult` with ``steps`` (inf if unreachable) and the argmin ``lr``, ``momentum``/``ema``.

    >>> r = steps_to_target([1, 1024], dim=1000, bins=30)
    >>> bool(r.steps[0] > 100 * r.steps[1])
    True
    """
    bs = np.atleast_1d(check.reals("batch_size", batch_size, check.POSITIVE))
    check.choice("optimizer", optimizer, ("sgd", "momentum", "ema"))
    check.power(precondition_power)
    check.tunable("momentum", momentum, check.UNIT_OPEN)
    check.tunable("ema", ema, check.UNIT_OPEN)
    check.tunable("lr", lr, check.POSITIVE, allow_none=False)
    check.real("target", target, check.POSITIVE)
    check.flag("exhaustive", exhaustive)
    check.flag("warn_edges", warn_edges)
    check.flag("refine", refine)
    mdl = make_model(model, dim=dim, bins=bins, **model_kwargs)
    check_target(mdl.spectrum, target)
    if optimizer == "momentum" and momentum is None:
        momentum = "tune"
    elif optimizer == "ema" and ema is None:
        ema = "tune"
    if momentum is not None and ema is not None:
        raise ValueError("momentum and ema together are not modelled; pick one")
    kind = "momentum" if momentum is not None else "ema" if ema is not None else "sgd"
    aux = _grid(momentum, default_momentum_grid()) if kind == "momentum" else _grid(ema, default_ema_grid())
    h1 = mdl.max_curvature(precondition_power)
    lrs = _grid(lr, default_lr_grid(h1, kind=kind))
    eff = kind == "momentum"
    if eff and not isinstance(lr, str):  # a user-given lr is the true α: convert to the effective grid per β
        eff = False
    res = mdl.steps_grid(bs, lrs, aux, kind=kind, precondition_power=precondition_power, target=target,
                         exhaustive=exhaustive, effective_lr=eff)
    found = res.lr_index >= 0
    lr_best = np.where(found, lrs[np.maximum(res.lr_index, 0)], np.nan)
    aux_best = None
    if aux is not None:
        aux_best = np.where(found, aux[np.maximum(res.aux_index, 0)], np.nan)
    steps = res.steps
    tune_lr, tune_aux = lrs.size > 1, aux is not None and aux.size > 1
    if refine and isinstance(mdl, NQM) and found.any() and (tune_lr or tune_aux):
        from lightning_sgd.nqm.search import refine as refine_optimum

        steps, lr_best, aux_best = refine_optimum(
            mdl.spectrum, bs, lr_best, aux_best, res.steps, kind=kind, power=precondition_power, target=target,
            lr_bounds=(float(lrs.min()), float(lrs.max())) if tune_lr else None,
            aux_bounds=(float(aux.min()), float(aux.max())) if tune_aux else None,
            lr_step=_spacing(lrs), aux_step=_spacing(1.0 - aux) if tune_aux else 1.0, effective_lr=eff)
    if eff:
        eff_lr = lr_best
        lr_best = lr_best * (1.0 - aux_best)
    else:
        eff_lr = None
    # the default grids end at the stability limit, so only their lower end is a search-space edge
    edge = found & (res.lr_index == 0) if lrs.size > 1 else np.zeros(bs.size, dtype=bool)
    if lrs.size > 1 and not isinstance(lr, str):
        edge |= found & (res.lr_index == lrs.size - 1)
    if warn_edges and edge.any():
        warnings.warn(f"best learning rate on the edge of the grid for batch sizes {bs[edge].tolist()}; widen it",
                      stacklevel=2)
    return StepsResult(
        batch_size=bs,
        steps=steps,
        lr=lr_best,
        momentum=aux_best if kind == "momentum" else None,
        ema=aux_best if kind == "ema" else None,
        effective_lr=eff_lr,
        at_grid_edge=edge,
    )


def optimal_lr(batch_size: ArrayLike, **kwargs: Any) -> np.ndarray:
    """The learning rate minimising the steps to the target (effective α/(1 − β) when momentum is used).

    Same arguments as :func:`steps_to_target`; the paper's Figure 14.
    """
    return steps_to_target(batch_size, **kwargs).effective_lr


def lower_bound_steps(batch_size: ArrayLike, target: float = 0.01, dim: int = 10_000) -> np.ndarray:
    """Information-theoretic lower bound (Zhang et al. 2019, section 3.6): with C = H the NQM is Gaussian mean
    estimation, whose best risk after N examples is d/(2N); so N ≥ d/(2·target) examples, i.e.
    d/(2·target·B) steps at batch size B (at least one step)."""
    bs = check.reals("batch_size", batch_size, check.POSITIVE)
    target = check.real("target", target, check.POSITIVE)
    dim = check.integer("dim", dim)
    return np.maximum(dim / (2.0 * target * bs), 1.0)


def risk(
    lr: ArrayLike,
    batch_size: ArrayLike = 1,
    steps: ArrayLike = None,
    *,
    precondition_power: float = 0.0,
    momentum: float | None = None,
    ema: float | None = None,
    dim: int = 10_000,
    bins: int | None = 100,
    model: str | NQM | InterpolationModel | None = None,
    **model_kwargs: Any,
) -> np.ndarray:
    """Exact expected risk.

    - constant learning rate: ``risk(lr, batch_size, steps)`` in closed form at the given step(s); lr,
      batch_size, steps and momentum/ema broadcast together.
    - schedule: ``risk(lrs, batch_size)`` with a per-step array (see :mod:`lightning_sgd.nqm.schedules`) gives
      the trajectory at t = 0..T by dynamic programming.
    """
    mdl = make_model(model, dim=dim, bins=bins, **model_kwargs)
    return mdl.risk(lr, batch_size, steps, precondition_power=precondition_power, momentum=momentum, ema=ema)
