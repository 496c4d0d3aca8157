"""The sweep's results: per batch size the fewest steps to target, the best hyper-parameters, the trial counts and an
edge-of-search-space warning; the fit S(B) = S_min (1 + B_noise / B) with a bootstrap interval on B_crit; the
gradient noise scale measured in the trials (the prediction of B_crit) next to it; written as JSON, CSV, PNG and to
W&B.

Which noise scale predicts which B_crit (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
section 2.2 and appendix D). The fit's B_crit = E_min/S_min is the noise scale B_noise = tr(HΣ)/(GᵀHG) of the
quadratic model, averaged over the run; B_simple = tr Σ/|G|² equals it only when H is a multiple of the identity, and
both grow during training. The prediction reported is each batch size's best trial read at the step it reached the
target, the median over batch sizes (and, as a second reading, the median over the trial); its ratio to the fit is
the check.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from typing import Any

import numpy as np
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


#: The noise-scale values of a trial's record that the table, CSV and plot show (see NoiseScaleRecorder.summary).
GNS_FIELDS = ("b_simple_at_target", "b_noise_at_target", "b_simple_median", "b_noise_median")


def summarize_study(cfg: SweepConfig, batch_size: int, study: optuna.Study) -> dict[str, Any]:
    from lightning_sgd.sweep.runner import trial_reached

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    diverged = [t for t in trials if t.state == TrialState.PRUNED]
    reached = [t for t in complete if trial_reached(t)]
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
        **{k: None for k in GNS_FIELDS},
        "gns_source": None,
        # steps of every non-divergent trial (None: not reached), for the bootstrap of the fit
        "trial_steps": [int(t.value) if trial_reached(t) else None for t in complete],  # type: ignore[arg-type]
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
        gns = best.user_attrs.get("gns") or {}
        row.update({k: gns.get(k) for k in GNS_FIELDS}, gns_source=gns.get("source"))
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


def bootstrap_b_crit(rows: list[dict[str, Any]], replicates: int = 1000, level: float = 0.95, seed: int = 0
                     ) -> dict[str, Any]:
    """Percentile interval of the fitted B_crit, resampling each batch size's non-divergent trials with replacement.

    A replicate draws, at every batch size, as many trials as it ran (with replacement), takes the fewest steps among
    the drawn trials that reached the target, and refits S(B); batch sizes where none of the drawn trials reached it
    drop out, and a replicate with fewer than 3 batch sizes left is not counted (``valid`` says how many were). This
    is the uncertainty of the search: how much the best steps, hence B_crit, depend on which quasi-random points
    happened to be tried. (Resampling the batch sizes themselves degenerates with the 3-6 batch sizes of a sweep.)
    """
    from lightning_sgd.noise_scale import fit_steps_vs_batch

    rng = np.random.default_rng(seed)
    per_b = [(r["batch_size"], r.get("trial_steps") or []) for r in rows]
    estimates = []
    for _ in range(replicates):
        points = []
        for b, steps in per_b:
            if not steps:
                continue
            drawn = [steps[i] for i in rng.integers(0, len(steps), len(steps))]
            hit = [s for s in drawn if s is not None]
            if hit:
                points.append((b, min(hit)))
        if len(points) < 3:
            continue
        try:
            _, b_noise = fit_steps_vs_batch([b for b, _ in points], [s for _, s in points])
        except ValueError:
            continue
        if math.isfinite(b_noise):
            estimates.append(b_noise)
    out: dict[str, Any] = {"replicates": replicates, "valid": len(estimates), "level": level}
    if len(estimates) < max(20, replicates // 2):  # too few to put a number on: say so rather than print one
        return {**out, "ok": False, "reason": f"only {len(estimates)} of {replicates} bootstrap replicates had 3 "
                                              "batch sizes that reached the target"}
    lo, hi = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2])
    return {**out, "ok": True, "low": float(lo), "high": float(hi), "median": float(np.median(estimates))}


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else None


def gns_prediction(cfg: SweepConfig, rows: list[dict[str, Any]], fit: dict[str, Any]) -> dict[str, Any]:
    """The noise scale measured in the trials as a prediction of the fit's B_crit: per quantity the median over the
    batch sizes that reached the target (each read from its best trial), and its ratio to B_crit."""
    hit = [r for r in rows if r["reached"]]
    out: dict[str, Any] = {k: _median([r.get(k) for r in hit]) for k in GNS_FIELDS}
    out["b_simple_override"] = cfg.b_simple
    for k in GNS_FIELDS:
        out[f"ratio_{k}"] = (out[k] / fit["b_crit"]) if fit.get("ok") and out[k] is not None else None
    if cfg.b_simple is not None and fit.get("ok"):
        out["ratio_b_simple_override"] = cfg.b_simple / fit["b_crit"]
    return out


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
    fit = fit_scaling(rows)
    if fit["ok"]:
        fit["bootstrap"] = bootstrap_b_crit(rows, seed=cfg.seed)
    return {
        "metric": cfg.metric,
        "target": cfg.target,
        "mode": cfg.resolved_mode(),
        "max_steps": cfg.max_steps,
        "eval_every": cfg.eval_every,
        "trials_per_batch_size": cfg.trials,
        "search_space": {name: {"low": p.low, "high": p.high, "scale": p.scale} for name, p in
                         cfg.search_space.items()},
        "unreached_value": cfg.max_steps + cfg.eval_every,
        "rows": rows,
        "fit": fit,
        "gns": gns_prediction(cfg, rows, fit),
        **extra,
    }


CSV_FIELDS = ("batch_size", "reached", "best_steps", "effective_lr", "trials_nondivergent", "trials_diverged",
              "trials_reached", "best_trial", "edge_warnings", *GNS_FIELDS)


def write_csv(path: str, summary: dict[str, Any]) -> None:
    names = sorted({k for r in summary["rows"] for k in r["best_params"]})
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *names])
        for r in summary["rows"]:
            cells = []
            for key in CSV_FIELDS:
                value = r.get(key)
                if key == "best_steps" and value is None:
                    value = "not reached"
                elif key == "edge_warnings":
                    value = " ".join(value or [])
                cells.append("" if value is None else value)
            writer.writerow([*cells, *(r["best_params"].get(n, "") for n in names)])


def _num(value: float | None, width: int = 9) -> str:
    return f"{value:{width}.3g}" if value is not None else f"{'-':>{width}s}"


def format_table(summary: dict[str, Any]) -> str:
    names = sorted({k for r in summary["rows"] for k in r["best_params"]})
    head = f"{'batch':>6s} {'steps':>12s} {'eff. LR':>9s} " + " ".join(f"{n:>9s}" for n in names)
    head += f" {'ok/div/hit':>10s} {'Bsimple@hit':>11s} {'Bnoise@hit':>10s}  warning"
    lines = [f"steps to {summary['metric']} {'>=' if summary['mode'] == 'max' else '<='} {summary['target']} "
             f"(budget {summary['max_steps']} steps, {summary['trials_per_batch_size']} trials per batch size)", head]
    for r in summary["rows"]:
        steps = str(r["best_steps"]) if r["reached"] else "not reached"
        eff = f"{r['effective_lr']:.3g}" if r["effective_lr"] is not None else "-"
        params = " ".join(f"{r['best_params'][n]:9.3g}" if n in r["best_params"] else f"{'-':>9s}" for n in names)
        counts = f"{r['trials_nondivergent']}/{r['trials_diverged']}/{r['trials_reached']}"
        warn = ("best at edge: " + ", ".join(r["edge_warnings"]) + " (widen the space)") if r["edge_warnings"] else ""
        lines.append(f"{r['batch_size']:>6d} {steps:>12s} {eff:>9s} {params} {counts:>10s} "
                     f"{_num(r.get('b_simple_at_target'), 11)} {_num(r.get('b_noise_at_target'), 10)}  {warn}")
    fit = summary["fit"]
    if fit["ok"]:
        boot = fit.get("bootstrap") or {}
        interval = (f" [{boot['low']:.3g}, {boot['high']:.3g}] ({100 * boot['level']:.0f}% bootstrap over trials)"
                    if boot.get("ok") else f" (no interval: {boot.get('reason', 'not computed')})")
        lines.append(f"fit S(B) = S_min (1 + B_noise/B): S_min = {fit['s_min']:.1f} steps, "
                     f"B_crit = B_noise = {fit['b_noise']:.3g}{interval}")
    else:
        lines.append(f"no S(B) fit: {fit['reason']}")
    gns = summary.get("gns") or {}
    parts = []
    for key, label in (("b_simple_at_target", "B_simple"), ("b_noise_at_target", "B_noise")):
        if gns.get(key) is not None:
            ratio = gns.get(f"ratio_{key}")
            parts.append(f"{label} {gns[key]:.3g}" + (f" ({ratio:.2f}x the fit)" if ratio is not None else ""))
    if parts:
        median = ", ".join(f"{label} {gns[k]:.3g}" for k, label in (("b_simple_median", "B_simple"),
                                                                    ("b_noise_median", "B_noise"))
                           if gns.get(k) is not None)
        lines.append("GNS prediction at the step the target is reached (median over batch sizes of the best "
                     f"trials): {', '.join(parts)}; median over the trials: {median}")
    if gns.get("b_simple_override") is not None:
        ratio = gns.get("ratio_b_simple_override")
        lines.append(f"B_simple given by hand: {gns['b_simple_override']:.3g}" +
                     (f" ({ratio:.2f}x the fit)" if ratio is not None else ""))
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
    if cfg.wandb and not cfg.report_only:  # report_only opens no run: the sweep's own run already holds the results
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
                         config={"sweep": {k: v for k, v in summary.items() if k not in ("rows", "fit", "gns")}})
        names = sorted({k for r in summary["rows"] for k in r["best_params"]})
        columns = ["batch_size", "reached", "best_steps", "effective_lr", "trials_nondivergent", *GNS_FIELDS, *names]
        table = wandb.Table(columns=columns)
        for r in summary["rows"]:
            table.add_data(r["batch_size"], r["reached"], r["best_steps"], r["effective_lr"], r["trials_nondivergent"],
                           *(r.get(k) for k in GNS_FIELDS), *(r["best_params"].get(n) for n in names))
        run.log({"sweep/results": table, "sweep/steps_vs_batch": wandb.Image(png)})
        for group in ("fit", "gns"):
            for key, value in (summary.get(group) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    run.summary[f"sweep/{group}/{key}"] = value
        for key, value in (summary["fit"].get("bootstrap") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run.summary[f"sweep/fit/bootstrap/{key}"] = value
        run_dir = os.path.dirname(run.dir) if getattr(run, "dir", None) else None
        run.finish()
        return run_dir
    except Exception as err:  # W&B is a convenience here: the JSON/CSV/PNG are already written
        warnings.warn(f"sweep: W&B logging failed ({type(err).__name__}: {err}); results are in {cfg.output_dir}.",
                      stacklevel=2)
        return None
