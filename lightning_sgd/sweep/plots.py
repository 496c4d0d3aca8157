"""Plots of a sweep: steps-to-target vs batch size (log-log, perfect-scaling line, S(B) fit, B_crit with its
interval, the measured noise scale) and the best (effective) learning rate vs batch size."""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_sgd._extras import require
from lightning_sgd._files import atomic_write


def plot_sweep(summary: dict[str, Any], path: str, b_simple: float | None = None) -> None:
    """Write the two-panel PNG of ``summary`` (as returned by :func:`lightning_sgd.sweep.results.summarize`): the
    fitted B_crit with its bootstrap interval (shaded) next to the noise scale measured in the trials at the step
    the target was reached; ``b_simple``, a value given by hand, is drawn too."""
    matplotlib = require("matplotlib", "the sweep's plot")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    hit = [r for r in rows if r["reached"]]
    miss = [r for r in rows if not r["reached"]]
    fig, (ax_s, ax_lr) = plt.subplots(1, 2, figsize=(11, 4.2))

    target = f"{summary['metric']} {'≥' if summary['mode'] == 'max' else '≤'} {summary['target']}"
    if hit:
        b = np.array([r["batch_size"] for r in hit], dtype=float)
        s = np.array([r["best_steps"] for r in hit], dtype=float)
        ax_s.plot(b, s, "o-", color="C0", label="measured (best trial)")
        # Perfect scaling through the smallest batch size: doubling B halves the steps (slope -1).
        grid = np.geomspace(min(r["batch_size"] for r in rows), max(r["batch_size"] for r in rows), 100)
        ax_s.plot(grid, s[0] * b[0] / grid, "--", color="gray", label="perfect scaling")
        fit = summary.get("fit", {})
        if fit.get("ok"):
            ax_s.plot(grid, fit["s_min"] * (1 + fit["b_noise"] / grid), "-", color="C1", alpha=0.8,
                      label=f"fit $S_{{min}}(1+B_{{noise}}/B)$: $S_{{min}}$={fit['s_min']:.0f}")
            boot = fit.get("bootstrap") or {}
            interval = f" [{boot['low']:.0f}, {boot['high']:.0f}]" if boot.get("ok") else ""
            ax_s.axvline(fit["b_crit"], color="C1", ls=":",
                         label=f"fitted $B_{{crit}}$ = {fit['b_crit']:.0f}{interval}")
            if boot.get("ok"):
                ax_s.axvspan(boot["low"], boot["high"], color="C1", alpha=0.12, lw=0)
        nqm = summary.get("nqm") or {}
        if nqm.get("ok"):
            ax_s.plot(nqm["batch_sizes"], nqm["steps"], "-", color="C5", alpha=0.8, label="NQM fitted to the curve")
        gns = summary.get("gns") or {}
        for key, color, ls, label in (("b_simple_at_target", "C2", "-.", "$B_{simple}$"),
                                      ("b_noise_at_target", "C4", "--", "$B_{noise}$")):
            if gns.get(key) is not None:
                ax_s.axvline(gns[key], color=color, ls=ls, label=f"GNS {label} at target = {gns[key]:.0f}")
        if b_simple is not None:
            ax_s.axvline(b_simple, color="C2", ls=(0, (1, 1)), label=f"$B_{{simple}}$ given = {b_simple:.0f}")
    for r in miss:  # not reached: drawn at the budget, hollow, and labelled so it never reads as a measurement
        ax_s.plot([r["batch_size"]], [summary["max_steps"]], "x", color="C3", ms=9)
        ax_s.annotate("not reached", (r["batch_size"], summary["max_steps"]), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=8, color="C3")
    if miss:
        ax_s.axhline(summary["max_steps"], color="C3", lw=0.8, alpha=0.5, label="step budget")
    ax_s.set_xscale("log", base=2)
    ax_s.set_yscale("log")
    ax_s.set_xlabel("batch size B")
    ax_s.set_ylabel(f"steps to {target}")
    ax_s.set_title("steps to target vs batch size")
    ax_s.grid(True, which="both", alpha=0.3)
    ax_s.legend(fontsize=8)

    lr_rows = [r for r in hit if r.get("effective_lr") is not None]
    if lr_rows:
        b = [r["batch_size"] for r in lr_rows]
        searched = any("momentum" in r["best_params"] for r in lr_rows)
        # without a searched momentum the sweep does not know β (a fixed one may sit in the overrides): plain η
        ax_lr.plot(b, [r["effective_lr"] for r in lr_rows], "o-", color="C0",
                   label="effective LR η/(1−β)" if searched else "LR η (momentum not searched)")
        if any("momentum" in r["best_params"] for r in lr_rows):
            ax_lr.plot(b, [r["best_params"]["lr"] for r in lr_rows], "s--", color="C4", alpha=0.7, label="LR η")
        for r in lr_rows:
            if r["edge_warnings"]:
                ax_lr.annotate("edge", (r["batch_size"], r["effective_lr"]), textcoords="offset points",
                               xytext=(0, 6), ha="center", fontsize=8, color="C3")
        ax_lr.set_xscale("log", base=2)
        ax_lr.set_yscale("log")
        ax_lr.legend(fontsize=8)
    ax_lr.set_xlabel("batch size B")
    ax_lr.set_ylabel("best learning rate")
    ax_lr.set_title("optimal (effective) learning rate")
    ax_lr.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{summary['trials_per_batch_size']} quasi-random trials per batch size, budget "
                 f"{summary['max_steps']} steps, evaluated every {summary['eval_every']}", fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # a kill mid-write keeps the previous plot, never half a PNG
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
