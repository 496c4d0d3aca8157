"""The NQM figures of Zhang et al. 2019: 3a, 3b(+3c), 4, 13 and 14, as PNG + CSV.

Each ``figure_*`` function computes the data (a list of row dicts), writes ``<out>/nqm_fig<id>.csv`` and
``<out>/nqm_fig<id>.png``, and returns the rows. :func:`make_figures` runs a selection of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lightning_sgd._extras import require
from lightning_sgd._files import atomic_write, write_csv
from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.api import lower_bound_steps, steps_to_target
from lightning_sgd.nqm.core import make_spectrum
from lightning_sgd.nqm.schedules import optimize_piecewise_constant

__all__ = ["make_figures", "figure_3a", "figure_3b", "figure_4", "figure_13", "figure_14", "FIGURES"]

POWERS = (0.0, 0.25, 0.5, 0.75)
COLORS = {0.0: "tab:blue", 0.25: "tab:orange", 0.5: "tab:green", 0.75: "tab:red"}


def _plt() -> Any:
    matplotlib = require("matplotlib", "the NQM figures (lightning-sgd nqm figures)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_args(out: str, quick: bool, target: float = None) -> None:
    """The common figure arguments, checked (and the folder created) before any figure data is computed."""
    check.flag("quick", quick)
    if target is not None:
        check.real("target", target)
    os.makedirs(check.path("out", out), exist_ok=True)


def _batch_sizes(quick: bool) -> np.ndarray:
    return 2.0 ** np.arange(0, 21, 2 if quick else 1)


def _loglog(ax: Any, xlabel: str = "Batch size", ylabel: str = "Steps to threshold") -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _rows(result: Any, **extra: Any) -> list[dict]:
    d = result.as_dict()
    return [{**extra, **{k: float(v[i]) for k, v in d.items()}} for i in range(len(result.batch_size))]


def _versus_plain_sgd(out: str, name: str, variant: str, label: str, variant_kwargs: dict, *, quick: bool,
                      target: float) -> list[dict]:
    """Steps to target vs batch size per preconditioning power: plain SGD (dashed) against ``variant`` (solid)."""
    _check_args(out, quick, target)
    plt = _plt()
    bs = _batch_sizes(quick)
    rows: list[dict] = []
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for p in POWERS:
        plain = steps_to_target(bs, precondition_power=p, target=target, warn_edges=False)
        other = steps_to_target(bs, precondition_power=p, target=target, warn_edges=False, **variant_kwargs)
        rows += _rows(plain, figure=name, power=p, optimizer="sgd")
        rows += _rows(other, figure=name, power=p, optimizer=variant)
        ax.plot(bs, plain.steps, "--", color=COLORS[p])
        ax.plot(bs, other.steps, "-", color=COLORS[p], label=f"pow {p:g}")
    ax.plot(bs, lower_bound_steps(bs, target), "k--", label="lower bound")
    _loglog(ax)
    ax.set_title(f"NQM: {label} (solid) vs plain SGD (dashed)")
    ax.legend(fontsize=8)
    _save(fig, out, name, rows)
    return rows


def figure_3a(out: str, *, quick: bool = False, target: float = 0.01) -> list[dict]:
    """Steps to target vs batch size per preconditioning power: plain SGD (dashed) and tuned momentum (solid)."""
    return _versus_plain_sgd(out, "3a", "momentum", "momentum", {"momentum": "tune"}, quick=quick, target=target)


def figure_3b(out: str, *, quick: bool = False, target: float = 0.01, pieces: int = 50) -> list[dict]:
    """(b) optimized piecewise-constant schedules (solid) vs fixed LR (dashed); (c) the schedules for power 0."""
    check.integer("pieces", pieces)
    _check_args(out, quick, target)
    plt = _plt()
    spec = make_spectrum()
    bs = 2.0 ** np.arange(0, 21, 4 if quick else 2)
    powers = (0.0, 0.5) if quick else POWERS
    rows: list[dict] = []
    schedules: dict[float, np.ndarray] = {}
    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in powers:
        fixed = steps_to_target(bs, precondition_power=p, target=target, warn_edges=False)
        sched_steps = []
        for i, b in enumerate(bs):
            lb = int(np.ceil(lower_bound_steps(b, target, spec.dim)))
            res = optimize_piecewise_constant(spec, b, target=target, pieces=pieces, precondition_power=p, lo=lb,
                                              hi=int(fixed.steps[i]), init_lr=float(fixed.lr[i]),
                                              rtol=0.05 if quick else 0.01)
            sched_steps.append(res.steps)
            rows.append({"figure": "3b", "power": p, "batch_size": float(b), "fixed_lr_steps": float(fixed.steps[i]),
                         "schedule_steps": res.steps, "final_lr": float(res.lrs[-1]), "lower_bound": lb,
                         **{f"lr_piece_{k}": float(v) for k, v in enumerate(res.lrs)}})
            if p == 0.0:
                schedules[float(b)] = res.lrs
        ax.plot(bs, fixed.steps, "--", color=COLORS[p])
        ax.plot(bs, sched_steps, "-", color=COLORS[p], label=f"pow {p:g}")
    ax.plot(bs, lower_bound_steps(bs, target), "k--", label="lower bound")
    _loglog(ax)
    ax.set_title("(b) optimized schedules (solid) vs fixed LR (dashed)")
    ax.legend(fontsize=8)
    for b, lrs in schedules.items():
        if 16 <= b <= 4096 or quick:
            ax_c.plot(np.arange(1, pieces + 1), lrs, label=f"BS {int(b)}")
    ax_c.set_yscale("log", base=2)
    ax_c.set_xlabel("Pieces")
    ax_c.set_ylabel("Learning rate")
    ax_c.set_title("(c) optimized LR schedules, power 0")
    ax_c.legend(fontsize=8)
    _save(fig, out, "3b", rows)
    return rows


def figure_4(out: str, *, quick: bool = False, target: float = 0.01) -> list[dict]:
    """EMA of the iterates (solid, γ tuned) vs plain SGD (dashed), per preconditioning power."""
    # exhaustive: the EMA landscape has several local optima in (α, γ) that the coarse-to-fine search can miss
    return _versus_plain_sgd(out, "4", "ema", "EMA", {"ema": "tune", "exhaustive": True}, quick=quick, target=target)


def figure_13(out: str, *, quick: bool = False, targets: ArrayLike = (0.1, 0.03, 0.01, 0.003, 0.001)) -> list[dict]:
    """Steps vs batch size for several loss thresholds (plain SGD, fixed tuned LR; App. E.5)."""
    targets = check.reals("targets", targets).ravel().tolist()
    _check_args(out, quick)
    plt = _plt()
    bs = 2.0 ** np.arange(0, 23, 2 if quick else 1)
    rows: list[dict] = []
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for tgt in targets:
        r = steps_to_target(bs, target=tgt, warn_edges=False)
        rows += _rows(r, figure="13", target=tgt, optimizer="sgd")
        ax.plot(bs, r.steps, "-o", ms=2, label=f"{tgt:g}")
    _loglog(ax)
    ax.set_title("NQM: loss threshold")
    ax.legend(fontsize=8)
    _save(fig, out, "13", rows)
    return rows


def figure_14(out: str, *, quick: bool = False, target: float = 0.01) -> list[dict]:
    """Optimal (effective) LR vs batch size: (a) no momentum, (b) β = 0.9, (c) tuned β; dashed = (a)."""
    _check_args(out, quick, target)
    plt = _plt()
    bs = 2.0 ** np.arange(0, 23, 2 if quick else 1)
    rows: list[dict] = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    titles = ("(a) without momentum", "(b) fixed momentum 0.9", "(c) tuned momentum")
    for p in POWERS:
        plain = steps_to_target(bs, precondition_power=p, target=target, warn_edges=False)
        fixed = steps_to_target(bs, precondition_power=p, momentum=0.9, target=target, warn_edges=False)
        tuned = steps_to_target(bs, precondition_power=p, momentum="tune", target=target, warn_edges=False)
        for name, r, ax in zip(("sgd", "momentum_0.9", "momentum_tuned"), (plain, fixed, tuned), axes):
            rows += _rows(r, figure="14", power=p, optimizer=name)
            ax.plot(bs, r.effective_lr, "-", color=COLORS[p], label=f"pow {p:g}")
            if name != "sgd":
                ax.plot(bs, plain.effective_lr, "--", color=COLORS[p], alpha=0.6)
    for ax, title in zip(axes, titles):
        _loglog(ax, ylabel="Optimal (effective) learning rate")
        ax.set_title(title)
    axes[-1].legend(fontsize=8)
    _save(fig, out, "14", rows)
    return rows


def save_png(fig: Any, path: str, dpi: int = 120) -> None:
    """``fig`` as a PNG at ``path``, written atomically, then closed."""
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _save(fig: Any, out: str, name: str, rows: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, f"nqm_fig{name}.csv"), rows)
    save_png(fig, os.path.join(out, f"nqm_fig{name}.png"))


FIGURES = {"3a": figure_3a, "3b": figure_3b, "4": figure_4, "13": figure_13, "14": figure_14}


def make_figures(out: str, which: Iterable[str] = tuple(FIGURES), *, quick: bool = False, log: bool = print) -> dict:
    """Write the selected figures (PNG + CSV) to ``out``; returns {id: seconds taken}.

    The ids and the output folder are checked (and the folder created) before the first figure is computed.
    """
    out = check.path("out", out)
    which = [which] if isinstance(which, str) else list(which)
    unknown = [name for name in which if name not in FIGURES]
    if unknown or not which:
        raise ValueError(f"which: unknown figure(s) {unknown}; choose from {sorted(FIGURES)}" if unknown else
                         f"which is empty; choose from {sorted(FIGURES)}")
    check.flag("quick", quick)
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable (e.g. print) or None, got {log!r}.")
    os.makedirs(out, exist_ok=True)
    took = {}
    for name in which:
        t0 = time.perf_counter()
        FIGURES[name](out, quick=quick)
        took[name] = time.perf_counter() - t0
        if log:
            log(f"figure {name}: {os.path.join(out, f'nqm_fig{name}.png')} (+ .csv) in {took[name]:.1f}s")
    return took
