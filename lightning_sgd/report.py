"""``lightning-sgd report RUN``: one offline HTML page (PNGs embedded, and written beside it) about a training run.

What the page shows, from whatever the run measured (a panel whose measurement is absent is left out, with a line
saying what would produce it):

- the gradient noise scale B_simple and B_noise over training with their standard-error bands, against the training
  batch, and the regime log2(B/B_simple) (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training");
- a recommendation: the critical batch now and at the start, the LR the linear and square-root scaling rules give at
  that batch, and the change in steps the empirical model ``S(B) = S_min (1 + B_noise/B)`` predicts;
- the top Hessian eigenvalues against the stability threshold 2/η (2(1+β)/η with heavy-ball momentum; Cohen et al.
  2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability"), truncated points marked;
- the trace and ‖H‖_F·η/√B (Wu et al. 2018, "How SGD Selects the Global Minima in Over-parameterized Learning");
- the gradient covariance against the Hessian along eigen- and random directions on log-log axes (C ≈ H; Zhang et al.
  2019, "Which Algorithmic Choices Matter at Which Batch Sizes?");
- n·Δ and the batch bound δ·n·Δ + 1 (Yin et al. 2018, "Gradient Diversity");
- the deep-bootstrap real and ideal test errors with the gap between them (Nakkiran et al. 2021, "The Deep
  Bootstrap Framework");
- validation of the EMA weights against the raw weights.

The numbers of the recommendation come from :func:`recommend`, a pure function of the logged values.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_sgd._extras import require
from lightning_sgd.run_log import RunLog, find_optimizer, load_run


# ------------------------------------------------------------------------------------------- the recommendation
def steps_ratio(b_noise: float, batch_from: float, batch_to: float) -> float:
    """``S(B_to) / S(B_from)`` under ``S(B) = S_min (1 + B_noise/B)``: the factor on the number of steps.

    .. math:: \\frac{S(B')}{S(B)} = \\frac{1 + B_{noise}/B'}{1 + B_{noise}/B}

    >>> steps_ratio(100.0, 50.0, 100.0)  # from batch 50 (3 S_min) to the critical batch (2 S_min)
    0.6666666666666666
    """
    return (1.0 + b_noise / batch_to) / (1.0 + b_noise / batch_from)


def examples_ratio(b_noise: float, batch_from: float, batch_to: float) -> float:
    """``E(B_to) / E(B_from)`` under ``E(B) = E_min (1 + B/B_noise)``: the factor on the examples processed.

    >>> examples_ratio(100.0, 50.0, 100.0)  # 1.5 E_min -> 2 E_min
    1.3333333333333333
    """
    return (1.0 + batch_to / b_noise) / (1.0 + batch_from / b_noise)


def scaled_lr(lr: float, batch_from: float, batch_to: float, rule: str) -> float:
    """The LR at ``batch_to`` by the linear rule (``lr·B'/B``, Goyal et al. 2017) or the square-root rule
    (``lr·sqrt(B'/B)``, Krizhevsky 2014; Hoffer et al. 2017).

    >>> scaled_lr(0.1, 100, 400, "linear"), scaled_lr(0.1, 100, 400, "sqrt")
    (0.4, 0.2)
    """
    factor = batch_to / batch_from
    if rule == "linear":
        return lr * factor
    if rule == "sqrt":
        return lr * math.sqrt(factor)
    raise ValueError(f"scaled_lr: rule must be 'linear' or 'sqrt', got {rule!r}.")


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@dataclass
class Recommendation:
    """What the logged noise scale says about the batch size. ``None`` fields: not measured."""

    source: str  # "B_noise" or "B_simple": the estimate of the critical batch
    batch_size: float  # the training batch the run used (gns/batch_size at the latest measurement)
    step: int  # the step of the latest usable measurement
    b_crit: float  # the critical batch now (latest usable measurement)
    b_crit_se: float | None  # its standard error, when logged
    b_crit_start: float | None  # at the first usable measurement
    step_start: int | None
    batch: int  # the recommended batch: the critical batch, rounded
    lr: float | None  # the run's LR (config, else sharpness/λ_max)
    lr_linear: float | None
    lr_sqrt: float | None
    steps_ratio: float  # S(batch)/S(batch_size)
    examples_ratio: float  # E(batch)/E(batch_size)
    regime: str  # noise-dominated / curvature-dominated / at the critical batch
    unusable: int = 0  # measurements skipped for being inf/NaN/<= 0

    def lines(self) -> list[str]:
        """The recommendation in a few plain sentences (the report and the end-of-fit summary print them)."""
        se = f" ± {self.b_crit_se:.3g}" if self.b_crit_se is not None and math.isfinite(self.b_crit_se) else ""
        out = [f"critical batch ≈ {self.source} = {self.b_crit:.4g}{se} at step {self.step}"
               + (f" (was {self.b_crit_start:.4g} at step {self.step_start})"
                  if self.b_crit_start is not None and self.step_start != self.step else "")
               + f"; training batch {self.batch_size:.0f}: {self.regime}."]
        change = self.steps_ratio - 1.0
        direction = "fewer" if change < 0 else "more"
        out.append(f"batch {self.batch}: S(B) = S_min(1 + B_noise/B) predicts {abs(change):.0%} {direction} steps "
                   f"than batch {self.batch_size:.0f} ({self.examples_ratio:.2f}x the examples).")
        if self.lr is not None and self.lr_linear is not None and self.lr_sqrt is not None:
            out.append(f"LR at batch {self.batch}: {self.lr_linear:.3g} (linear rule), {self.lr_sqrt:.3g} "
                       f"(square-root rule), from {self.lr:.3g} at batch {self.batch_size:.0f}.")
        else:
            factor = self.batch / self.batch_size
            out.append(f"LR at batch {self.batch}: x{factor:.3g} (linear rule) or x{math.sqrt(factor):.3g} "
                       "(square-root rule) of the run's LR (not found in the saved config).")
        if self.unusable:
            out.append(f"{self.unusable} measurement(s) of {self.source} were not finite and positive (the gradient "
                       "was buried in noise) and are left out.")
        return out


def run_lr(run: RunLog) -> float | None:
    """The run's LR: the optimizer's ``lr`` in the saved config, else η = sharpness/λ_max from CurvatureSpectrum."""
    lr, _ = find_optimizer(run.config)
    if _usable(lr):
        return lr
    for key in run.matching("curvature/"):
        if key.endswith("/sharpness"):
            prefix = key[: -len("sharpness")]
            step, value = run.last(key)  # type: ignore[misc]
            eig = run.at(prefix + "eig_0", step)
            if _usable(eig) and _usable(value):
                return value / eig  # type: ignore[operator]
    return None


def recommend(run: RunLog) -> Recommendation | None:
    """The recommendation from the logged ``gns/b_noise`` (else ``gns/b_simple``), ``gns/batch_size`` and the LR;
    ``None`` when the run has no usable noise-scale measurement."""
    candidates = [(source, key, run.values(key), [(s, v) for s, v in zip(run.steps(key), run.values(key))
                                                  if _usable(v)])
                  for source, key in (("B_noise", "gns/b_noise"), ("B_simple", "gns/b_simple"))]
    found = next((c for c in candidates if c[3]), None)
    if found is None:
        return None
    source, key, values, good = found
    step, b_crit = good[-1]
    batch_size = run.at_or_before("gns/batch_size", step)  # the batch in force at that measurement
    if batch_size is None or not _usable(batch_size):
        return None
    se = run.at(key + "_se", step)
    batch = max(1, round(b_crit))
    lr = run_lr(run)
    ratio = batch_size / b_crit  # against the same estimate the recommendation uses
    regime = (f"below {source}: noise-dominated (a larger batch still cuts steps almost linearly)" if ratio < 0.5
              else f"above {source}: curvature-dominated (a larger batch buys few steps)" if ratio > 2.0
              else f"near {source}, the critical batch")
    return Recommendation(
        source=source, batch_size=batch_size, step=step, b_crit=b_crit, b_crit_se=se,
        b_crit_start=good[0][1] if len(good) > 1 else None, step_start=good[0][0] if len(good) > 1 else None,
        batch=batch, lr=lr,
        lr_linear=scaled_lr(lr, batch_size, batch, "linear") if lr is not None else None,
        lr_sqrt=scaled_lr(lr, batch_size, batch, "sqrt") if lr is not None else None,
        steps_ratio=steps_ratio(b_crit, batch_size, batch), examples_ratio=examples_ratio(b_crit, batch_size, batch),
        regime=regime, unusable=len(values) - len(good))


# ------------------------------------------------------------------------------------------------- headlines
def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def curvature_prefixes(run: RunLog) -> list[str]:
    """``curvature/<operator>/`` prefixes with eigenvalues logged."""
    return sorted({k[: -len("eig_0")] for k in run.matching("curvature/") if k.endswith("/eig_0")})


def headline(run: RunLog) -> list[str]:
    """The run's headline measurements, one line each (B_simple ± SE, B_noise, λ_max vs its threshold, n·Δ,
    bootstrap gap); empty when the run measured none of them."""
    lines = []
    for name, key in (("B_simple", "gns/b_simple"), ("B_noise", "gns/b_noise")):
        last = run.last(key)
        if last:
            se = run.at(key + "_se", last[0])
            se_text = f" ± {_fmt(se, 3)}" if se is not None and math.isfinite(se) else ""
            batch = run.at_or_before("gns/batch_size", last[0])
            batch_text = f" (training batch {batch:.0f})" if batch else ""
            lines.append(f"{name}: {_fmt(last[1])}{se_text} at step {last[0]}{batch_text}")
    for prefix in curvature_prefixes(run):
        step, lam = run.last(prefix + "eig_0")  # type: ignore[misc]
        sharp, thr = run.at(prefix + "sharpness", step), run.at(prefix + "sharpness_threshold", step)
        text = f"λ_max ({prefix.split('/')[1]}): {_fmt(lam)} at step {step}"
        if sharp and thr and lam:
            text += f" vs 2(1+β)/η = {_fmt(thr * lam / sharp)} (λ_max·η / 2(1+β) = {_fmt(sharp / thr, 3)})"
        if run.at(prefix + "truncated", step):
            text += " [truncated by the budget]"
        lines.append(text)
    last = run.last("diversity/n_delta")
    if last:
        bound = run.at("diversity/batch_bound", last[0])
        lines.append(f"n·Δ: {_fmt(last[1])} at step {last[0]}" + (f" (batch bound δ·n·Δ + 1 = {_fmt(bound)})"
                                                                    if bound is not None else ""))
    last = run.last("bootstrap/gap")
    if last:
        lines.append(f"bootstrap gap (real − ideal test error): {_fmt(last[1], 3)} at step {last[0]}")
    return lines


# ------------------------------------------------------------------------------------------------------ panels
@dataclass
class Panel:
    key: str  # file name stem: report_<key>.png
    title: str
    meaning: str  # one line: what the panel means
    png: bytes


def _figure():
    matplotlib = require("matplotlib", "the run report (lightning-sgd report)")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.6), dpi=100)
    return plt, fig, ax


def _png(plt: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _positive(steps: Sequence[int], values: Sequence[float]) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v) and v > 0]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _noise_scale_panel(run: RunLog) -> Panel | None:
    if "gns/b_simple" not in run and "gns/b_noise" not in run:
        return None
    plt, fig, ax = _figure()
    for name, key, color in (("B_simple", "gns/b_simple", "tab:blue"), ("B_noise", "gns/b_noise", "tab:orange")):
        steps, values = _positive(run.steps(key), run.values(key))
        if not steps:
            continue
        ax.plot(steps, values, color=color, marker=".", label=name)
        se = [run.at(key + "_se", s) for s in steps]
        if any(e is not None for e in se):
            lo = [max(v - (e or 0.0), v * 1e-3) for v, e in zip(values, se)]
            hi = [v + (e or 0.0) for v, e in zip(values, se)]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.25, label=f"{name} ± SE")
    _draw_training_batch(ax, run)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("batch size")
    ax.legend(fontsize=8)
    return Panel("noise_scale", "Gradient noise scale", "The critical batch size: below it a larger batch cuts "
                 "steps almost linearly; above it returns diminish (McCandlish et al. 2018).", _png(plt, fig))


def _draw_training_batch(ax: Any, run: RunLog) -> None:
    """The training batch over steps (``gns/batch_size``), dashed, where the run logged it."""
    if "gns/batch_size" in run:
        ax.step(run.steps("gns/batch_size"), run.values("gns/batch_size"), where="post", color="k", ls="--",
                label="training batch")


def _regime_panel(run: RunLog) -> Panel | None:
    if "gns/regime" not in run:
        return None
    plt, fig, ax = _figure()
    pairs = [(s, v) for s, v in zip(run.steps("gns/regime"), run.values("gns/regime")) if math.isfinite(v)]
    ax.plot([s for s, _ in pairs], [v for _, v in pairs], marker=".", color="tab:purple")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("log2(B / B_simple)")
    return Panel("regime", "Regime", "Below 0 the run is noise-dominated (a bigger batch would help), above 0 "
                 "curvature-dominated (a bigger batch would mostly waste examples).", _png(plt, fig))


def _recommendation_panel(rec: Recommendation) -> Panel:
    plt, fig, ax = _figure()
    b_noise = rec.b_crit
    lo, hi = min(rec.batch_size, rec.batch) / 16, max(rec.batch_size, rec.batch) * 16
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [1 + b_noise / b for b in grid], color="tab:blue", label="steps S(B)/S_min")
    ax.plot(grid, [1 + b / b_noise for b in grid], color="tab:green", label="examples E(B)/E_min")
    ax.scatter([rec.batch_size], [1 + b_noise / rec.batch_size], color="k", zorder=3, label="training batch")
    ax.scatter([rec.batch], [1 + b_noise / rec.batch], color="tab:red", zorder=3, label="critical batch")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.legend(fontsize=8)
    return Panel("recommendation", "Steps and examples vs batch size (predicted)",
                 f"The empirical model with B_noise = {b_noise:.4g}: at the critical batch both steps and examples "
                 "are twice their minimum.", _png(plt, fig))


def _curvature_panels(run: RunLog) -> list[Panel]:
    panels = []
    for prefix in curvature_prefixes(run):
        op = prefix.split("/")[1]
        plt, fig, ax = _figure()
        i = 0
        while prefix + f"eig_{i}" in run:
            steps, values = _positive(run.steps(prefix + f"eig_{i}"), run.values(prefix + f"eig_{i}"))
            ax.plot(steps, values, marker=".", lw=1.2 if i == 0 else 0.8, label=f"λ_{i + 1}" if i < 3 else None)
            i += 1
        thr_steps, thr = [], []
        for s in run.steps(prefix + "sharpness"):
            sharp, t, lam = run.at(prefix + "sharpness", s), run.at(prefix + "sharpness_threshold", s), \
                run.at(prefix + "eig_0", s)
            if sharp and t and lam and sharp > 0:
                thr_steps.append(s)
                thr.append(t * lam / sharp)
        if thr:
            ax.step(thr_steps, thr, where="post", color="k", ls="--", label="2(1+β)/η")
        trunc = [s for s, v in zip(run.steps(prefix + "truncated"), run.values(prefix + "truncated")) if v]
        if trunc:
            ys = [run.at(prefix + "eig_0", s) for s in trunc]
            ax.scatter([s for s, y in zip(trunc, ys) if y and y > 0], [y for y in ys if y and y > 0], marker="x",
                       color="tab:red", s=60, zorder=3, label="truncated by the budget")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("eigenvalue")
        ax.legend(fontsize=8, ncol=2)
        panels.append(Panel(f"eigenvalues_{op}", f"Top {op} eigenvalues and the stability threshold",
                            "Gradient descent is stable while λ_max < 2(1+β)/η; training often climbs to that edge "
                            "(Cohen et al. 2021). With Adam the threshold does not apply." + (
                                " Crosses mark measurements the budget truncated." if trunc else ""),
                            _png(plt, fig)))
        if prefix + "trace" in run or prefix + "frobenius_bound" in run:
            plt, fig, ax = _figure()
            if prefix + "trace" in run:
                steps, values = run.steps(prefix + "trace"), run.values(prefix + "trace")
                ax.plot(steps, values, marker=".", color="tab:blue", label="tr H")
                errs = [run.at(prefix + "trace_stderr", s) or 0.0 for s in steps]
                ax.fill_between(steps, [v - e for v, e in zip(values, errs)], [v + e for v, e in zip(values, errs)],
                                color="tab:blue", alpha=0.25)
                ax.set_ylabel("trace")
            if prefix + "frobenius_bound" in run:
                ax2 = ax.twinx()
                ax2.plot(run.steps(prefix + "frobenius_bound"), run.values(prefix + "frobenius_bound"), marker=".",
                         color="tab:orange", label="‖H‖_F·η/√B")
                ax2.set_ylabel("‖H‖_F·η/√B")
                ax2.legend(fontsize=8, loc="lower right")
            ax.set_xlabel("step")
            ax.legend(fontsize=8, loc="upper left")
            panels.append(Panel(f"trace_{op}", "Trace and ‖H‖_F·η/√B" if prefix + "frobenius_bound" in run else "Trace",
                                "Total curvature; SGD's noise only lets it settle where ‖H‖_F·η/√B stays O(1) "
                                "(Wu et al. 2018).", _png(plt, fig)))
        curv_keys = sorted(run.matching(prefix + "alignment/curvature_"), key=lambda k: int(k.rsplit("_", 1)[1]))
        if curv_keys:
            step = run.last(curv_keys[0])[0]  # type: ignore[index]
            plt, fig, ax = _figure()
            for when, color in ((run.steps(curv_keys[0])[0], "tab:gray"), (step, "tab:red")):
                xs, ys = [], []
                for ck in curv_keys:
                    vk = ck.replace("/curvature_", "/variance_")
                    x, y = run.at(ck, when), run.at(vk, when)
                    if x and y and x > 0 and y > 0:
                        xs.append(x)
                        ys.append(y)
                ax.scatter(xs, ys, color=color, label=f"step {when}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("curvature vᵀHv")
            ax.set_ylabel("gradient variance Var(vᵀg_i)")
            slope = run.at(prefix + "alignment_slope", step)
            corr = run.at(prefix + "alignment_corr", step)
            ax.legend(fontsize=8)
            panels.append(Panel(f"alignment_{op}", "Gradient covariance vs curvature (C ≈ H)",
                                "Along eigen- and random directions; points on a line of slope 1 on these log-log "
                                f"axes mean C ∝ H, the noisy quadratic model's assumption (last: slope "
                                f"{_fmt(slope, 3)}, corr {_fmt(corr, 3)}).", _png(plt, fig)))
        elif prefix + "alignment_slope" in run:
            plt, fig, ax = _figure()
            ax.plot(run.steps(prefix + "alignment_slope"), run.values(prefix + "alignment_slope"), marker=".",
                    label="log-log slope")
            ax.plot(run.steps(prefix + "alignment_corr"), run.values(prefix + "alignment_corr"), marker=".",
                    label="log-log correlation")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            panels.append(Panel(f"alignment_{op}", "Gradient covariance vs curvature (C ≈ H)",
                                "Log-log fit of Var(vᵀg_i) on vᵀHv: slope and correlation near 1 mean C ∝ H.",
                                _png(plt, fig)))
    return panels


def _diversity_panel(run: RunLog) -> Panel | None:
    if "diversity/n_delta" not in run:
        return None
    plt, fig, ax = _figure()
    ax.plot(run.steps("diversity/n_delta"), run.values("diversity/n_delta"), marker=".", label="n·Δ")
    if "diversity/batch_bound" in run:
        ax.plot(run.steps("diversity/batch_bound"), run.values("diversity/batch_bound"), ls=":", marker="x",
                label="batch bound δ·n·Δ + 1")
    _draw_training_batch(ax, run)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return Panel("diversity", "Gradient diversity", "Mini-batch SGD with batches up to δ·n·Δ + 1 gets the same "
                 "per-example progress as batch 1 (Yin et al. 2018); n·Δ ≈ 1 + B_simple when Δ ≪ 1.", _png(plt, fig))


def _bootstrap_panel(run: RunLog) -> Panel | None:
    real = next((k for k in ("bootstrap/real_test_error", "bootstrap/real_val_error", "bootstrap/real_test_loss")
                 if k in run), None)
    if real is None:
        return None
    ideal = real.replace("/real_", "/ideal_")
    plt, fig, ax = _figure()
    steps, r = run.steps(real), run.values(real)
    ax.plot(steps, r, marker=".", label="real world (n examples, re-used)")
    if ideal in run:
        i = [run.at(ideal, s) for s in steps]
        pairs = [(s, a, b) for s, a, b in zip(steps, r, i) if b is not None]
        ax.plot([p[0] for p in pairs], [p[2] for p in pairs], marker=".", label="ideal world (fresh examples)")
        ax.fill_between([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], color="tab:red",
                        alpha=0.2, label="gap")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("step")
    ax.set_ylabel(real.rsplit("_", 2)[-2] + " " + real.rsplit("_", 1)[-1])
    ax.legend(fontsize=8)
    return Panel("bootstrap", "Deep bootstrap: real vs ideal world", "While the gap is small, generalization is "
                 "governed by optimization speed on fresh data (Nakkiran et al. 2021).", _png(plt, fig))


def _ema_panel(run: RunLog) -> Panel | None:
    pairs = [(raw, ema) for raw, ema in (("val/loss", "val_ema/loss"), ("val/acc", "val_ema/acc"))
             if raw in run and ema in run]
    if not pairs:
        return None
    plt, fig, ax = _figure()
    for raw, ema in pairs[:1]:
        ax.plot(run.steps(raw), run.values(raw), marker=".", label=f"{raw} (raw weights)")
        ax.plot(run.steps(ema), run.values(ema), marker=".", label=f"{ema} (EMA weights)")
        ax.set_ylabel(raw.split("/")[1])
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return Panel("ema", "EMA vs raw weights", "An average of recent weights cancels part of SGD's noise: below the "
                 "raw curve, the EMA is the better model to keep.", _png(plt, fig))


#: panel -> what would produce it (for the "not measured" lines)
MISSING: dict[str, str] = {
    "noise_scale": "gradient noise scale: add lightning_sgd.callbacks.GradientNoiseScale",
    "curvature": "curvature spectrum: add lightning_sgd.callbacks.CurvatureSpectrum",
    "alignment": "C ≈ H alignment: CurvatureSpectrum(alignment=True)",
    "diversity": "gradient diversity: add lightning_sgd.callbacks.GradientDiversity",
    "bootstrap": "deep bootstrap: add lightning_sgd.callbacks.DeepBootstrap",
    "ema": "EMA vs raw weights: add lightning_sgd.plugins.EMAWeights(validate='both')",
}


#: panel key prefix -> the measurement of :data:`MISSING` it shows
_MEASUREMENT = {"noise": "noise_scale", "regime": "noise_scale", "recommendation": "noise_scale",
                "eigenvalues": "curvature", "trace": "curvature", "alignment": "alignment", "diversity": "diversity",
                "bootstrap": "bootstrap", "ema": "ema"}


def build_panels(run: RunLog) -> tuple[list[Panel], Recommendation | None, list[str]]:
    """Every panel the run's measurements allow, the recommendation, and a line for each absent measurement."""
    rec = recommend(run)
    panels = [p for p in (_noise_scale_panel(run), _regime_panel(run)) if p is not None]
    if rec is not None:
        panels.append(_recommendation_panel(rec))
    panels += _curvature_panels(run)
    panels += [p for p in (_diversity_panel(run), _bootstrap_panel(run), _ema_panel(run)) if p is not None]
    measured = {_MEASUREMENT.get(p.key.split("_")[0], p.key) for p in panels}
    missing = [f"Not measured in this run: {text}." for key, text in MISSING.items() if key not in measured
               and not (key == "alignment" and "curvature" not in measured)]  # no curvature: one line says it
    return panels, rec, missing


# ------------------------------------------------------------------------------------------------------- HTML
_CSS = ("body{font-family:sans-serif;max-width:760px;margin:2em auto;color:#222}"
        "figure{margin:1.5em 0}figcaption{font-size:0.9em;color:#444}img{max-width:100%}"
        ".rec{background:#f3f6fa;padding:0.6em 1em;border-left:4px solid #3b6ea5}"
        ".missing{color:#777;font-size:0.9em}")


def render_html(run: RunLog, panels: list[Panel], rec: Recommendation | None, missing: list[str],
                metrics: dict[str, float] | None = None) -> str:
    """The page: headline, recommendation, panels (PNG as base64 data URIs), and the absent measurements."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lightning-sgd report: {esc(run.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>lightning-sgd report</h1><p>Run: <code>{esc(str(run.source))}</code></p>"]
    lines = headline(run)
    if lines:
        parts.append("<h2>Headline</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>")
    finals = metrics or {k: run.last(k)[1] for k in run.measured_keys()  # type: ignore[index]
                         if k.startswith(("val/", "val_ema/", "test/")) and not k.endswith("_step")}
    if finals:
        parts.append("<p>" + ", ".join(f"{esc(k)} = {v:.4g}" for k, v in sorted(finals.items())) + "</p>")
    parts.append("<h2>Recommendation</h2>")
    if rec is not None:
        parts.append("<div class='rec'>" + "".join(f"<p>{esc(line)}</p>" for line in rec.lines()) + "</div>")
    else:
        parts.append("<p class='missing'>No recommendation: the run logged no finite, positive gradient noise scale "
                     "(gns/b_noise or gns/b_simple) with its batch size (gns/batch_size).</p>")
    for panel in panels:
        data = base64.b64encode(panel.png).decode("ascii")
        parts.append(f"<figure><h3>{esc(panel.title)}</h3><img alt='{esc(panel.title)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{esc(panel.meaning)}</figcaption></figure>")
    if missing:
        parts.append("<h2>Not measured</h2>" + "".join(f"<p class='missing'>{esc(m)}</p>" for m in missing))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_sheet(path: str | Path, run: RunLog, panels: list[Panel], rec: Recommendation | None,
                columns: int = 2) -> Path:
    """One PNG with the headline, the recommendation and every panel in a grid: the page at a glance (a picture
    of the report for a README or a slide, drawn by matplotlib, not a browser screenshot)."""
    matplotlib = require("matplotlib", "the run report (lightning-sgd report)")
    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(panels) / columns))
    text = headline(run) + ([""] + rec.lines() if rec is not None else [])
    top = 0.9 + 0.22 * len(text)
    fig = plt.figure(figsize=(7.0 * columns, top + 3.9 * rows), dpi=80)
    fig.text(0.01, 1 - 0.25 / fig.get_figheight(), "lightning-sgd report", fontsize=16, weight="bold", va="top")
    for i, line in enumerate(text):
        fig.text(0.01, 1 - (0.6 + 0.22 * i) / fig.get_figheight(), line, fontsize=10, va="top")
    for i, panel in enumerate(panels):
        ax = fig.add_axes((
            (i % columns) / columns, (rows - 1 - i // columns) * 3.9 / fig.get_figheight(),
            1 / columns, 3.6 / fig.get_figheight()))
        ax.imshow(mpimg.imread(io.BytesIO(panel.png), format="png"))
        ax.set_title(panel.title, fontsize=11)
        ax.axis("off")
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run: RunLog | str | Path, out: str | Path | None = None,
                 metrics: dict[str, float] | None = None, sheet: bool = False) -> Path:
    """Write ``report.html`` (self-contained) and ``report_<panel>.png`` beside it into ``out`` (default: the run's
    own folder), and with ``sheet`` the one-picture summary ``report_sheet.png``; return the HTML path."""
    if not isinstance(run, RunLog):
        run = load_run(run)
    out_dir = Path(out) if out is not None else run.folder
    out_dir.mkdir(parents=True, exist_ok=True)
    panels, rec, missing = build_panels(run)
    for panel in panels:
        (out_dir / f"report_{panel.key}.png").write_bytes(panel.png)
    if sheet:
        write_sheet(out_dir / "report_sheet.png", run, panels, rec)
    path = out_dir / "report.html"
    path.write_text(render_html(run, panels, rec, missing, metrics), encoding="utf-8")
    return path


def main(argv: Sequence[str]) -> Path:
    """``lightning-sgd report RUN [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-sgd report",
        description="Write an offline HTML report (with PNGs) of a run: noise scale with its recommendation, "
                    "curvature, diversity, deep bootstrap, EMA.")
    parser.add_argument("run", help="a run folder (runs/: its newest CSV log), a CSV log folder or its metrics.csv, "
                                    "or a W&B offline run folder (runs/wandb/offline-run-...)")
    parser.add_argument("--out", default=None, help="folder for report.html and its PNGs (default: the run's folder)")
    parser.add_argument("--sheet", action="store_true",
                        help="also write report_sheet.png: the headline, recommendation and panels in one picture")
    args = parser.parse_args(list(argv))
    try:
        run = load_run(args.run)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"lightning-sgd report: {err}") from None
    path = write_report(run, args.out, sheet=args.sheet)
    for line in headline(run):
        print(line)
    rec = recommend(run)
    if rec is not None:
        for line in rec.lines():
            print(line)
    print(f"report: {path}")
    return path
