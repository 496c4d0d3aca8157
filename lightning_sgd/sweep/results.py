"""The sweep's results: per batch size the fewest steps to target, the best hyper-parameters, the trial counts and an
edge-of-search-space warning; the fit S(B) = S_min (1 + B_noise / B); written as JSON, CSV, PNG and to W&B."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from lightning_sgd._files import atomic_write
from lightning_sgd.sweep.config import SweepConfig


def effective_lr(values: dict[str, float]) -> float | None:
    """Effective learning rate of heavy-ball SGD, η / (1 − β) (Shallue et al. 2019); η when there is no momentum."""
    lr = values.get("lr")
    if lr is None:
        return None
    momentum = values.get("momentum", 0.0)
    return lr / (1.0 - momentum) if momentum < 1 else None


def edge_warnings(cfg: SweepConfig, values: dict[str, float]) -> list[str]:
    """Names (``lr:high``, ``momentum:low``) of best values within ``edge_fraction`` of an edge of the space."""
    out = []
    for name, param in cfg.search_space.items():
        if name not in values:
            continue
        pos = param.unit_position(values[name])
        if pos < cfg.edge_fraction:
            out.append(f"{name}:{'high' if param.scale == 'one_minus_log' else 'low'}")
        elif pos > 1 - cfg.edge_fraction:
            out.append(f"{name}:{'low' if param.scale == 'one_minus_log' else 'high'}")
    return out


def summarize_study(cfg: SweepConfig, batch_size: int, study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    diverged = [t for t in trials if t.state == TrialState.PRUNED]
    reached = [t for t in complete if t.value is not None and math.isfinite(t.value)]
    row: dict[str, Any] = {
        "batch_size": batch_size,
        "reached": bool(reached),
        "best_steps": None,
        "best_trial": None,
        "best_params": {},
        "effective_lr": None,
        "trials_nondivergent": len(complete),
        "trials_diverged": len(diverged),
        "trials_reached": len(reached),
        "edge_warnings": [],
    }
    if reached:
        # Fewest steps; ties (steps are multiples of eval_every) go to the earlier trial, deterministically.
        best = min(reached, key=lambda t: (t.value, t.number))
        values = dict(best.user_attrs.get("values", {}))
        row.update(
            best_steps=int(best.value),  # type: ignore[arg-type]
            best_trial=best.number,
            best_params=values,
            effective_lr=effective_lr(values),
            edge_warnings=edge_warnings(cfg, values),
        )
    return row


def fit_scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit S(B) = S_min (1 + B_noise / B) to the batch sizes that reached the target; B_crit = B_noise."""
    from lightning_sgd.noise_scale import fit_steps_vs_batch

    points = [(r["batch_size"], r["best_steps"]) for r in rows if r["reached"]]
    if len({b for b, _ in points}) < 3:  # two parameters: with 2 points the "fit" interpolates and checks nothing
        return {"ok": False, "reason": "fewer than 3 batch sizes reached the target", "n_points": len(points)}
    s_min, b_noise = fit_steps_vs_batch([b for b, _ in points], [s for _, s in points])
    # McCandlish et al. 2018: S(B) = S_min (1 + B_noise/B), E(B) = E_min (1 + B/B_noise),
    # B_crit = E_min/S_min = B_noise.
    return {"ok": True, "s_min": s_min, "b_noise": b_noise, "b_crit": b_noise, "n_points": len(points)}


def nqm_prediction(rows: list[dict[str, Any]], reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the noisy quadratic model's batch and step scales to the measured curve (lightning_sgd.nqm.fit) and
    return its predicted steps on a batch-size grid; ``{"ok": False, "reason": ...}`` when it cannot."""
    points = [(r["batch_size"], r["best_steps"]) for r in rows if r["reached"]]
    if len(points) < 3:
        return {"ok": False, "reason": "fewer than 3 batch sizes reached the target"}
    try:
        import numpy as np

        from lightning_sgd.nqm.fit import fit_to_measurement

        fit = fit_to_measurement([b for b, _ in points], [s for _, s in points], reference=reference)
        grid = np.geomspace(min(r["batch_size"] for r in rows), max(r["batch_size"] for r in rows), 25)
        return {"ok": True, "batch_sizes": grid.tolist(), "steps": [float(x) for x in fit.predict(grid)],
                "batch_scale": fit.batch_scale, "step_scale": fit.step_scale, "rms_log_error": fit.rms_log_error}
    except Exception as err:  # optional overlay: never lose the sweep's own results over it
        return {"ok": False, "reason": f"{type(err).__name__}: {err}"}


def summarize(cfg: SweepConfig, studies: dict[int, optuna.Study]) -> dict[str, Any]:
    rows = [summarize_study(cfg, b, studies[b]) for b in sorted(studies)]
    extra = {}
    if cfg.nqm:
        reference = {"momentum": "tune"} if "momentum" in cfg.search_space else None
        extra["nqm"] = nqm_prediction(rows, reference)
    return {
        "metric": cfg.metric,
        "target": cfg.target,
        "mode": cfg.resolved_mode(),
        "max_steps": cfg.max_steps,
        "eval_every": cfg.eval_every,
        "trials_per_batch_size": cfg.trials,
        "search_space": {name: {"low": p.low, "high": p.high, "scale": p.scale} for name, p in
                         cfg.search_space.items()},
        "rows": rows,
        "fit": fit_scaling(rows),
        **extra,
    }


CSV_FIELDS = ("batch_size", "reached", "best_steps", "effective_lr", "trials_nondivergent", "trials_diverged",
              "trials_reached", "best_trial", "edge_warnings")


def write_csv(path: str, summary: dict[str, Any]) -> None:
    names = sorted({k for r in summary["rows"] for k in r["best_params"]})
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *names])
        for r in summary["rows"]:
            cells = []
            for key in CSV_FIELDS:
                value = r[key]
                if key == "best_steps" and value is None:
                    value = "not reached"
                elif key == "edge_warnings":
                    value = " ".join(value)
                cells.append("" if value is None else value)
            writer.writerow([*cells, *(r["best_params"].get(n, "") for n in names)])


def format_table(summary: dict[str, Any]) -> str:
    names = sorted({k for r in summary["rows"] for k in r["best_params"]})
    head = f"{'batch':>6s} {'steps':>12s} {'eff. LR':>9s} " + " ".join(f"{n:>9s}" for n in names)
    head += f" {'ok/div/hit':>10s}  warning"
    lines = [f"steps to {summary['metric']} {'>=' if summary['mode'] == 'max' else '<='} {summary['target']} "
             f"(budget {summary['max_steps']} steps, {summary['trials_per_batch_size']} trials per batch size)", head]
    for r in summary["rows"]:
        steps = str(r["best_steps"]) if r["reached"] else "not reached"
        eff = f"{r['effective_lr']:.3g}" if r["effective_lr"] is not None else "-"
        params = " ".join(f"{r['best_params'][n]:9.3g}" if n in r["best_params"] else f"{'-':>9s}" for n in names)
        counts = f"{r['trials_nondivergent']}/{r['trials_diverged']}/{r['trials_reached']}"
        warn = ("best at edge: " + ", ".join(r["edge_warnings"]) + " (widen the space)") if r["edge_warnings"] else ""
        lines.append(f"{r['batch_size']:>6d} {steps:>12s} {eff:>9s} {params} {counts:>10s}  {warn}")
    fit = summary["fit"]
    if fit["ok"]:
        lines.append(f"fit S(B) = S_min (1 + B_noise/B): S_min = {fit['s_min']:.1f} steps, "
                     f"B_noise = B_crit = {fit['b_noise']:.1f}")
    else:
        lines.append(f"no S(B) fit: {fit['reason']}")
    return "\n".join(lines)


def write_outputs(cfg: SweepConfig, summary: dict[str, Any], quiet: bool = False) -> dict[str, str]:
    """Write results.json, results.csv and steps_vs_batch.png to ``cfg.output_dir``; log to W&B when enabled."""
    from lightning_sgd.sweep.plots import plot_sweep

    os.makedirs(cfg.output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(cfg.output_dir, "results.json"),
        "csv": os.path.join(cfg.output_dir, "results.csv"),
        "png": os.path.join(cfg.output_dir, "steps_vs_batch.png"),
    }
    with atomic_write(paths["json"]) as f:
        json.dump(summary, f, indent=2)
    write_csv(paths["csv"], summary)
    plot_sweep(summary, paths["png"], b_simple=cfg.b_simple)
    for r in summary["rows"]:
        if r["edge_warnings"]:
            warnings.warn(f"sweep: at batch size {r['batch_size']} the best value is at the edge of the search space "
                          f"({', '.join(r['edge_warnings'])}): widen the space.", stacklevel=2)
        if not r["reached"]:
            warnings.warn(f"sweep: no trial reached {summary['metric']} {summary['target']} at batch size "
                          f"{r['batch_size']} within {summary['max_steps']} steps.", stacklevel=2)
    if cfg.wandb:
        run_dir = log_to_wandb(cfg, summary, paths["png"])
        if run_dir:
            paths["wandb"] = run_dir
    if not quiet:
        print(format_table(summary))
        print("results: " + ", ".join(f"{k} {v}" for k, v in paths.items()), file=sys.stdout)
    return paths


def log_to_wandb(cfg: SweepConfig, summary: dict[str, Any], png: str) -> str | None:
    """Log the table, the plot and the fit to one W&B run (offline without credentials); never fatal."""
    try:
        import wandb

        from lightning_sgd.loggers import wandb_credentials_present

        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lightning-sgd"), name=cfg.study_name,
                         job_type="sweep", dir=cfg.output_dir, mode=mode, reinit="create_new",
                         config={"sweep": {k: v for k, v in summary.items() if k not in ("rows", "fit")}})
        names = sorted({k for r in summary["rows"] for k in r["best_params"]})
        columns = ["batch_size", "reached", "best_steps", "effective_lr", "trials_nondivergent", *names]
        table = wandb.Table(columns=columns)
        for r in summary["rows"]:
            table.add_data(r["batch_size"], r["reached"], r["best_steps"], r["effective_lr"], r["trials_nondivergent"],
                           *(r["best_params"].get(n) for n in names))
        run.log({"sweep/results": table, "sweep/steps_vs_batch": wandb.Image(png)})
        for key, value in summary["fit"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run.summary[f"sweep/fit/{key}"] = value
        run_dir = os.path.dirname(run.dir) if getattr(run, "dir", None) else None
        run.finish()
        return run_dir
    except Exception as err:  # W&B is a convenience here: the JSON/CSV/PNG are already written
        warnings.warn(f"sweep: W&B logging failed ({type(err).__name__}: {err}); results are in {cfg.output_dir}.",
                      stacklevel=2)
        return None
