"""The sweep measures the gradient noise scale in every trial: the recorded values against the callback's own on a
replay of the same trial (same seed), the recipe's measurement callbacks dropped unless kept, the bootstrap interval of
the fitted B_crit against its ground truth, and the prediction in the table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pytorch_lightning.loggers.logger import Logger

from lightning_sgd.cli import run as cli_run
from lightning_sgd.sweep.cli import parse
from lightning_sgd.sweep.config import SweepConfig
from lightning_sgd.sweep.results import bootstrap_b_crit, fit_scaling, gns_prediction
from lightning_sgd.sweep.runner import build_trial, is_measurement_callback
from tests.test_sweep import load_trials, sweep_args, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

GNS_CALLBACKS = (", callbacks: [{class_path: lightning_sgd.callbacks.GradientNoiseScale, init_args: {schedule: 3}}, "
                 "{class_path: lightning_sgd.callbacks.GradientDiversity, init_args: {schedule: 10}}, "
                 "{class_path: tests.test_sweep.SleepEachStep, init_args: {seconds: 0.0}}]")


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: what the GradientNoiseScale callback itself reports, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((int(step), dict(metrics)))


def logged(rows: list[tuple[int, dict[str, float]]], key: str) -> list[tuple[int, float]]:
    return [(step, m[key]) for step, m in rows if key in m]


def last_before(series: list[tuple[int, float]], step: int) -> float:
    """The value the callback last logged before the optimizer step that took training to ``step``."""
    return [v for s, v in series if s < step][-1]


def test_recorded_noise_scale_equals_the_callbacks_own(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", callbacks=GNS_CALLBACKS)
    args = sweep_args(recipe, "--sweep.stop_at_best=false", "--sweep.b_noise_every=10", "--sweep.gns_beta=0.9",
                      batch_sizes="[16,32,64]", trials=2)
    summary = cli_run(args)
    cfg, _ = parse(args[1:])
    rows = {r["batch_size"]: r for r in summary["rows"]}
    for b in (16, 64):
        trials = load_trials("runs/sweep", "sweep", b)
        best = next(t for t in trials if t.number == rows[b]["best_trial"])
        record = best.user_attrs["gns"]
        assert record["source"] == "per_example" and record["b_noise_measurements"] >= 1
        # Ground truth: the same trial replayed (same recipe seed, same values) with the callback the sweep uses,
        # its own logged values read back through a logger.
        model, data, trainer = build_trial(cfg, b, best.user_attrs["values"], max_steps=best.user_attrs["steps_run"])
        from lightning_sgd.callbacks import GradientNoiseScale

        trainer.callbacks.append(GradientNoiseScale(schedule=1, beta=0.9, b_noise_schedule=10))
        memory = MemoryLogger()
        trainer.loggers = [memory]
        trainer.fit(model, datamodule=data)
        b_simple, b_noise = logged(memory.rows, "gns/b_simple"), logged(memory.rows, "gns/b_noise")
        assert len(b_simple) == best.user_attrs["steps_run"] == record["measurements"]
        assert len(b_noise) == record["b_noise_measurements"]
        steps = best.user_attrs["steps"]
        assert record["b_simple_at_target"] == pytest.approx(last_before(b_simple, steps), rel=1e-9)
        assert record["b_noise_at_target"] == pytest.approx(last_before(b_noise, steps), rel=1e-9)
        assert record["b_simple_median"] == pytest.approx(float(np.median([v for _, v in b_simple])), rel=1e-9)
        assert record["b_noise_median"] == pytest.approx(float(np.median([v for _, v in b_noise])), rel=1e-9)
        for step, value_simple, value_noise in record["series"]:  # the value at every evaluation
            assert value_simple == pytest.approx(last_before(b_simple, step), rel=1e-9)
            assert value_noise == pytest.approx(last_before(b_noise, step), rel=1e-9)
        assert [s for s, *_ in record["series"]] == list(range(5, best.user_attrs["steps_run"] + 1, 5))
        # the summary row is the best trial's record
        assert rows[b]["b_simple_at_target"] == record["b_simple_at_target"]
    # the prediction: medians over the batch sizes that reached the target, next to the fit in the table/JSON/CSV
    gns = summary["gns"]
    hit = [r for r in summary["rows"] if r["reached"]]
    assert gns["b_simple_at_target"] == pytest.approx(float(np.median([r["b_simple_at_target"] for r in hit])))
    saved = json.loads(Path("runs/sweep/results.json").read_text())
    assert saved["gns"] == gns and "bootstrap" in saved["fit"] or not saved["fit"]["ok"]
    with open("runs/sweep/results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["b_simple_at_target"]) == pytest.approx(rows[16]["b_simple_at_target"])


def test_trials_drop_the_recipes_measurement_callbacks_unless_kept(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", callbacks=GNS_CALLBACKS)
    cfg = SweepConfig(recipe=recipe, batch_sizes=[16], target=0.8, max_steps=10, eval_every=5)
    _, _, trainer = build_trial(cfg, 16, {"lr": 0.1})
    names = [type(cb).__name__ for cb in trainer.callbacks]
    assert "SleepEachStep" in names  # a user's callback that is not a measurement stays
    assert "GradientNoiseScale" not in names and "GradientDiversity" not in names
    cfg.keep_callbacks = True
    _, _, trainer = build_trial(cfg, 16, {"lr": 0.1})
    kept = [cb for cb in trainer.callbacks if is_measurement_callback(cb)]
    assert sorted(type(cb).__name__ for cb in kept) == ["GradientDiversity", "GradientNoiseScale"]
    # kept: the trial reads the recipe's own GradientNoiseScale (schedule 3) instead of adding a second one
    from lightning_sgd.sweep.runner import trial_noise_scale

    assert trial_noise_scale(cfg, trainer.callbacks) is next(cb for cb in kept if type(cb).__name__ ==
                                                             "GradientNoiseScale")


def test_bootstrap_interval_of_b_crit():
    s_min, b_noise = 400.0, 100.0
    sizes = [8, 16, 32, 64, 128, 256]
    exact = [round(s_min * (1 + b_noise / b)) for b in sizes]
    # Every trial at a batch size took the same steps: every replicate refits the same points, so the interval
    # collapses onto the fit itself.
    rows = [{"batch_size": b, "reached": True, "best_steps": s, "trial_steps": [s, s, s]} for b, s in
            zip(sizes, exact)]
    fit = fit_scaling(rows)
    boot = bootstrap_b_crit(rows, replicates=200)
    assert boot["ok"] and boot["valid"] == 200
    assert boot["low"] == pytest.approx(fit["b_crit"], rel=1e-6) and boot["high"] == pytest.approx(fit["b_crit"],
                                                                                                      rel=1e-6)
    # Search noise: each trial's steps are the true S(B) times a factor in [1, 1.5] (a worse learning rate only ever
    # costs steps). The 95% interval must contain the B_crit of the fit, and be wider than the degenerate one.
    rng = np.random.default_rng(0)
    noisy = []
    for b, s in zip(sizes, exact):
        steps = [int(s * f) for f in rng.uniform(1.0, 1.5, 8)]
        noisy.append({"batch_size": b, "reached": True, "best_steps": min(steps), "trial_steps": steps})
    fit = fit_scaling(noisy)
    boot = bootstrap_b_crit(noisy, replicates=400)
    assert boot["ok"] and boot["low"] < fit["b_crit"] < boot["high"] and boot["high"] / boot["low"] > 1.05
    # Too few batch sizes reached the target: no interval, and the reason says so.
    few = bootstrap_b_crit(rows[:2], replicates=50)
    assert not few["ok"] and "3 batch sizes" in few["reason"]


def test_prediction_ratio_and_hand_override():
    rows = [{"batch_size": b, "reached": True, "b_simple_at_target": v, "b_noise_at_target": 2 * v,
             "b_simple_median": v / 2, "b_noise_median": None} for b, v in ((8, 10.0), (16, 30.0), (32, 20.0))]
    rows.append({"batch_size": 64, "reached": False, "b_simple_at_target": None, "b_noise_at_target": None,
                 "b_simple_median": 1e6, "b_noise_median": None})  # not reached: not part of the prediction
    fit = {"ok": True, "b_crit": 40.0}
    pred = gns_prediction(SweepConfig(b_simple=80.0), rows, fit)
    assert pred["b_simple_at_target"] == 20.0 and pred["ratio_b_simple_at_target"] == 0.5
    assert pred["b_noise_at_target"] == 40.0 and pred["ratio_b_noise_at_target"] == 1.0
    assert pred["b_simple_median"] == 10.0 and pred["b_noise_median"] is None
    assert pred["b_simple_override"] == 80.0 and pred["ratio_b_simple_override"] == 2.0
    assert gns_prediction(SweepConfig(), rows, {"ok": False})["ratio_b_simple_at_target"] is None


def test_one_wandb_run_per_trial_grouped_by_sweep(tmp_path, monkeypatch):
    from tests.wandb_reader import read_complete_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = write_recipe(tmp_path / "tiny.yaml")
    cli_run(sweep_args(recipe, "--sweep.wandb_trials=true", "--sweep.stop_at_best=false", batch_sizes="[8]", trials=2,
                       max_steps=10))
    runs = [read_complete_run(d) for d in sorted(Path("runs/sweep/wandb").glob("offline-run-*"))]
    assert sorted(r.name for r in runs) == ["sweep-bs8-t0", "sweep-bs8-t1"]
    assert {r.group for r in runs} == {"sweep"}
    trials = {f"sweep-bs8-t{t.number}": t for t in load_trials("runs/sweep", "sweep", 8)}
    for r in runs:
        assert r.config["batch_size"] == 8
        assert r.config["lr"] == pytest.approx(trials[r.name].user_attrs["values"]["lr"])
        logged = r.keys()  # every key of the run's history (OfflineRun.keys, not a dict)
        assert "gns/b_simple" in logged and "val/acc" in logged
