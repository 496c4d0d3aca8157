"""lightning-sgd sweep: configuration errors, a tiny end-to-end sweep checked against its ground truth (Sobol points,
steps-to-target of a plain fit), resumption after kill -9, divergent trials, the S(B) fit."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import pytorch_lightning as pl
import torch
from optuna.trial import TrialState
from torch import nn

from lightning_sgd.cli import run as cli_run
from lightning_sgd.sweep.cli import parse, split_args
from lightning_sgd.sweep.config import SearchParam, SweepConfig, SweepConfigError
from lightning_sgd.sweep.results import edge_warnings, effective_lr, fit_scaling
from lightning_sgd.sweep.runner import build_trial, open_storage, study_name

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = """
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, max_epochs: 3{callbacks}}}
model:
  class_path: lightning_sgd.recipes.ClassificationModule
  init_args:
    network: {network}
    num_classes: 3
    optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.1}}}}
data:
  class_path: tests.helpers.TinyDataModule
  init_args: {{n: {n}, batch_size: 16, shuffle: true}}
"""
LINEAR = "{class_path: torch.nn.Linear, init_args: {in_features: 25, out_features: 3}}"
SPACE = "{lr: {low: 0.01, high: 100}, momentum: {low: 0.0, high: 0.99, scale: one_minus_log}}"


def write_recipe(path: Path, network: str = LINEAR, n: int = 256, callbacks: str = "") -> str:
    path.write_text(TINY_RECIPE.format(network=network, n=n, callbacks=callbacks))
    return str(path)


def sweep_args(recipe: str, *extra: str, batch_sizes: str = "[8,32]", trials: int = 3, max_steps: int = 40,
               target: float = 0.8) -> list[str]:
    return ["sweep", "--config", recipe, f"--sweep.batch_sizes={batch_sizes}", f"--sweep.target={target}",
            f"--sweep.trials={trials}", f"--sweep.max_steps={max_steps}", "--sweep.eval_every=5",
            "--sweep.threads=1", "--no_progress=true", "--sweep.wandb=false", f"--sweep.search_space={SPACE}", *extra]


def load_trials(output_dir: str, name: str, batch_size: int) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"sqlite:///{Path(output_dir).resolve() / 'sweep.db'}")
    return optuna.load_study(study_name=f"{name}-bs{batch_size}", storage=storage).get_trials(deepcopy=False)


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(search_space={"lr": SearchParam(low=1.0, high=0.1)}), "min > max"),
        (dict(search_space={"lr": SearchParam(low=0.0, high=1.0)}), "log scale needs low > 0"),
        (dict(search_space={"beta": SearchParam(low=0.0, high=0.9, scale="one_minus_log")}), "give `key`"),
        (dict(search_space={"momentum": SearchParam(low=0.5, high=1.0, scale="one_minus_log")}), "[0, 1)"),
        (dict(max_steps=110, eval_every=25), "multiple of sweep.eval_every"),
        (dict(batch_sizes=[]), "batch_sizes is empty"),
        (dict(batch_sizes=[8, 8]), "duplicates"),
        (dict(target=None), "target must be a finite number"),
        (dict(metric=""), "sweep.metric is empty"),
        (dict(trials=4, max_trials=2), "max_trials"),
        (dict(recipe=None), "no recipe"),
        (dict(gns_every=0), "gns_every must be >= 1"),
        (dict(b_noise_every=0), "b_noise_every must be >= 1 or null"),
        (dict(gns_beta=1.0), "gns_beta must be in"),
        (dict(b_simple=-3.0), "b_simple must be a finite number > 0"),
    ],
)
def test_config_errors(change, message):
    cfg = SweepConfig(batch_sizes=[8, 16], target=0.5, recipe="r.yaml", max_steps=100, eval_every=25)
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(SweepConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        cfg.validate()


def test_split_args_and_mode_inference(tmp_path):
    ours, recipe = split_args(["--config", "a.yaml", "--sweep.trials", "4", "--trainer.precision=64",
                               "--model.init_args.x", "3", "--sweep.target=0.5"])
    assert ours == ["--config", "a.yaml", "--sweep.trials", "4", "--sweep.target=0.5"]
    assert recipe == ["--trainer.precision=64", "--model.init_args.x", "3"]
    sweep_yaml = tmp_path / "s.yaml"
    sweep_yaml.write_text("recipe: r.yaml\nbatch_sizes: [4, 8]\ntarget: 0.3\nmetric: val/loss\n"
                          "overrides: ['--seed_everything=1']\n")
    cfg, _ = parse(["--sweep", str(sweep_yaml), "--sweep.trials=2", "--trainer.max_time=null"])
    assert (cfg.recipe, cfg.batch_sizes, cfg.trials, cfg.resolved_mode()) == ("r.yaml", [4, 8], 2, "min")
    assert cfg.overrides == ["--seed_everything=1", "--trainer.max_time=null"]
    assert SweepConfig(metric="val/acc").resolved_mode() == "max"


def test_bad_input_errors_before_any_trial(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", n=64)
    with pytest.raises(SystemExit, match=r"\[128\] are larger than the training set \(64 examples\)"):
        cli_run(sweep_args(recipe, batch_sizes="[8,128]"))
    with pytest.raises(SystemExit, match="'val/nope' is not logged.*val/acc"):
        cli_run(sweep_args(recipe, "--sweep.metric=val/nope"))
    with pytest.raises(SystemExit, match="min > max"):
        cli_run(sweep_args(recipe, "--sweep.search_space={lr: {low: 1.0, high: 0.1}}"))
    assert not Path("runs/sweep/sweep.db").exists()  # no trial ran, no storage was even created


# ------------------------------------------------------------------------------------------------ end to end
class MetricRecorder(pl.Callback):
    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module):
        self.history.append((trainer.global_step, float(trainer.callback_metrics["val/acc"])))


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_tiny_sweep_end_to_end_and_resume(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml")
    args = sweep_args(recipe, "--sweep.stop_at_best=false")
    summary = cli_run(args)
    rows = {r["batch_size"]: r for r in summary["rows"]}
    assert set(rows) == {8, 32}
    cfg, _ = parse(args[1:])
    for b in (8, 32):
        trials = load_trials("runs/sweep", "sweep", b)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
        # Quasi-random: trial k is point k of the scrambled Sobol sequence (seed 0) mapped to the space, with lr
        # log-uniform on [0.01, 100] and 1 - momentum log-uniform on [0.01, 1].
        from scipy.stats import qmc

        points = qmc.Sobol(2, scramble=True, seed=0).random(4)[:3]
        for trial, (u_lr, u_m) in zip(trials, points):
            assert trial.user_attrs["values"]["lr"] == pytest.approx(10 ** (-2 + 4 * u_lr), rel=1e-9)
            assert trial.user_attrs["values"]["momentum"] == pytest.approx(1 - 10 ** (-2 + 2 * u_m), rel=1e-9)
        reached = [t for t in trials if t.user_attrs["reached"]]
        # not reached: the finite value max_steps + eval_every (the first evaluation past the budget), never inf
        assert all(t.value == 45 for t in trials if not t.user_attrs["reached"])
        assert all(t.value <= 40 for t in reached)
        # the search parameter is 1 - β under its own name; `values` holds β
        assert set(trials[0].params) == {"lr", "one_minus_momentum"}
        assert trials[0].user_attrs["values"]["momentum"] == pytest.approx(1 - trials[0].params["one_minus_momentum"])
        # every evaluation went to trial.report (optuna-dashboard's learning curves), up to the stopping one
        for t in trials:
            assert sorted(t.intermediate_values) == list(range(5, t.user_attrs["steps_run"] + 1, 5))
        assert rows[b]["trials_nondivergent"] == 3 and rows[b]["trials_reached"] == len(reached) >= 1
        best = min(reached, key=lambda t: (t.value, t.number))
        assert rows[b]["best_steps"] == best.value and rows[b]["best_params"] == best.user_attrs["values"]
        assert best.value % 5 == 0
        if b != 8:
            continue
        # Ground truth for steps-to-target: a plain fit of the same configuration, evaluated every 5 steps without
        # stopping, first reaches 0.8 at exactly the trial's step count.
        model, data, trainer = build_trial(cfg, b, best.user_attrs["values"])
        recorder = MetricRecorder()
        trainer.callbacks.append(recorder)
        trainer.fit(model, datamodule=data)
        first = next(step for step, acc in recorder.history if acc >= 0.8)
        assert first == best.value
    assert summary["fit"]["ok"] is False  # two batch sizes cannot support a 2-parameter fit
    lines = Path("runs/sweep/results.csv").read_text().splitlines()
    assert lines[0].startswith("batch_size,reached,best_steps") and len(lines) == 3
    assert json.loads(Path("runs/sweep/results.json").read_text())["rows"] == summary["rows"]
    assert Path("runs/sweep/steps_vs_batch.png").stat().st_size > 10_000
    # Re-running the same command resumes: nothing left to do, so no trial is added or redone.
    numbers = {b: [(t.number, t.value) for t in load_trials("runs/sweep", "sweep", b)] for b in (8, 32)}
    again = cli_run(args)
    assert again["rows"] == summary["rows"]
    assert {b: [(t.number, t.value) for t in load_trials("runs/sweep", "sweep", b)] for b in (8, 32)} == numbers
    assert cli_run([*args, "--sweep.report_only=true"])["rows"] == summary["rows"]  # table from storage alone
    # report_only on a study that does not exist is an error, and creates nothing
    with pytest.raises(SystemExit, match="holds no study 'other-bs8'"):
        cli_run([*args, "--sweep.report_only=true", "--sweep.study_name=other"])
    with pytest.raises(SystemExit, match="no sweep storage at"):
        cli_run([*args, "--sweep.report_only=true", "--sweep.output_dir=runs/elsewhere"])
    assert not Path("runs/elsewhere/sweep.db").exists()
    assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(
        f"sqlite:///{Path('runs/sweep/sweep.db').resolve()}"), include_best_trial=False)] == ["sweep-bs8", "sweep-bs32"]
    # A changed configuration under the same study name is refused instead of mixing two sweeps.
    with pytest.raises(SystemExit, match="different sweep configuration"):
        cli_run(sweep_args(recipe, "--sweep.stop_at_best=false", target=0.9))


class ExpLogits(nn.Module):
    """Linear layer whose logits are exp(z): a large learning rate overflows float32 to inf and the loss to NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(25, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.linear(x))


def test_divergent_trials_are_marked_and_excluded(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", network="{class_path: tests.test_sweep.ExpLogits}")
    space = "--sweep.search_space={lr: {low: 0.01, high: 100.0}}"
    summary = cli_run(sweep_args(recipe, space, "--sweep.max_trials=8", batch_sizes="[16]", trials=2, max_steps=20))
    trials = load_trials("runs/sweep", "sweep", 16)
    diverged = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert diverged, "lr up to 100 on exp-logits overflows (lr >= 1 does)"
    assert all(t.user_attrs["diverged"] for t in diverged)
    assert all(t.user_attrs["values"]["lr"] > min(c.user_attrs["values"]["lr"] for c in complete) for t in diverged)
    (row,) = summary["rows"]
    assert row["trials_nondivergent"] == len(complete) == 2 and row["trials_diverged"] == len(diverged)
    reached = [t.value for t in complete if t.user_attrs["reached"]]
    assert row["best_steps"] == (min(reached) if reached else None)


def test_target_never_reached_is_reported_as_such(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml")
    with pytest.warns(UserWarning, match="no trial reached val/acc 1.5"):
        summary = cli_run(sweep_args(recipe, batch_sizes="[8]", trials=1, max_steps=10, target=1.5))
    (row,) = summary["rows"]
    assert row["reached"] is False and row["best_steps"] is None and row["trials_nondivergent"] == 1
    assert "not reached" in Path("runs/sweep/results.csv").read_text()


# ------------------------------------------------------------------------------------------------ kill -9
class SleepEachStep(pl.Callback):
    """Slows training down so a test can kill the sweep in the middle of a trial."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


@pytest.mark.slow
def test_kill_9_during_a_trial_then_resume(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml",
                          callbacks=", callbacks: [{class_path: tests.test_sweep.SleepEachStep}]")
    args = sweep_args(recipe, "--sweep.stop_at_best=false", target=2.0, max_steps=40)  # every trial runs 40 steps
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_sgd.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = tmp_path / "runs/sweep/sweep.db"
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not db.exists():
            continue
        try:  # read-only peek: opening an Optuna storage here would race the worker creating the schema
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                states = [row[0] for row in con.execute("SELECT state FROM trials")]
                # a running trial that has sampled its parameters (a trial killed before that is simply redrawn)
                sampled = con.execute("SELECT COUNT(*) FROM trials t WHERE t.state = 'RUNNING' AND EXISTS "
                                      "(SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id)").fetchone()[0]
        except sqlite3.Error:  # schema not created yet, or locked
            continue
        if states.count("COMPLETE") >= 2 and sampled:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=30)
    assert killed, f"never saw a running trial after 2 finished ones: {proc.stderr.read().decode()[-2000:]}"
    before = {b: load_trials(str(tmp_path / "runs/sweep"), "sweep", b) for b in (8, 32)}
    running = [t for b in (8, 32) for t in before[b] if t.state == TrialState.RUNNING]
    done = {(b, t.number): (t.params, t.value) for b in (8, 32) for t in before[b] if t.state == TrialState.COMPLETE}
    assert len(running) == 1 and len(done) >= 2
    summary = cli_run(args)  # the same command resumes
    after = {b: load_trials("runs/sweep", "sweep", b) for b in (8, 32)}
    for (b, number), (params, value) in done.items():  # finished trials kept, not redone
        assert after[b][number].state == TrialState.COMPLETE
        assert (after[b][number].params, after[b][number].value) == (params, value)
    (dead,) = running
    b_dead = next(b for b in (8, 32) if any(t.number == dead.number and t.state == TrialState.RUNNING for t in
                                            before[b]))
    assert after[b_dead][dead.number].state == TrialState.FAIL
    retries = [t for t in after[b_dead] if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == dead.params
    for b in (8, 32):  # the sweep completed: 3 non-divergent trials each, none left running
        assert [t.state for t in after[b]].count(TrialState.COMPLETE) == 3
        assert TrialState.RUNNING not in [t.state for t in after[b]]
    assert all(r["trials_nondivergent"] == 3 and not r["reached"] for r in summary["rows"])


# ------------------------------------------------------------------------------------------------ results
def test_fit_recovers_b_noise_from_synthetic_points():
    s_min, b_noise = 500.0, 300.0
    batch_sizes = [16, 32, 64, 128, 256, 512, 1024, 2048]
    # ±3% multiplicative measurement noise (fixed pattern): the log-space least squares must stay within 5%.
    wiggle = [1.03, 0.97, 1.02, 0.98, 1.03, 0.97, 1.01, 0.99]
    rows = [{"batch_size": b, "reached": True, "best_steps": s_min * (1 + b_noise / b) * w}
            for b, w in zip(batch_sizes, wiggle)]
    rows.append({"batch_size": 4096, "reached": False, "best_steps": None})  # not reached: left out of the fit
    fit = fit_scaling(rows)
    assert fit["ok"] and fit["n_points"] == 8
    assert fit["b_noise"] == pytest.approx(b_noise, rel=0.05) and fit["b_crit"] == fit["b_noise"]
    assert fit["s_min"] == pytest.approx(s_min, rel=0.05)
    exact = fit_scaling([{"batch_size": b, "reached": True, "best_steps": s_min * (1 + b_noise / b)}
                         for b in batch_sizes])
    assert exact["b_noise"] == pytest.approx(b_noise, rel=1e-6)
    assert not fit_scaling(rows[:2])["ok"]


def test_effective_lr_and_edge_warnings():
    assert effective_lr({"lr": 0.1, "momentum": 0.9}) == pytest.approx(1.0)
    assert effective_lr({"lr": 0.1}) == 0.1 and effective_lr({"momentum": 0.9}) is None
    cfg = SweepConfig(search_space={"lr": SearchParam(1e-3, 10.0),
                                    "momentum": SearchParam(0.5, 0.99, scale="one_minus_log")}, edge_fraction=0.1)
    assert edge_warnings(cfg, {"lr": 0.1, "momentum": 0.9}) == []
    assert edge_warnings(cfg, {"lr": 9.0, "momentum": 0.989}) == ["lr:high", "momentum:high"]
    assert edge_warnings(cfg, {"lr": 1.1e-3, "momentum": 0.51}) == ["lr:low", "momentum:low"]
    assert np.isclose(cfg.search_space["momentum"].unit_position(0.9), (math.log(0.1) - math.log(0.01)) /
                      (math.log(0.5) - math.log(0.01)))


def test_study_names_are_per_batch_size():
    assert study_name(SweepConfig(study_name="abc"), 64) == "abc-bs64"


def test_a_sweep_names_its_recipe_as_fit_does_from_any_folder(tmp_path, monkeypatch):
    """`recipe: recipes/mnist1d.yaml` (as the packaged sweep YAMLs say) or `recipe: mnist1d` resolve to the packaged
    recipe from a folder without a recipes/ directory, as `lightning-sgd fit --config` does."""
    from lightning_sgd.cli import recipes_dir
    from lightning_sgd.sweep.config import SweepConfig
    from lightning_sgd.sweep.runner import trial_args

    monkeypatch.chdir(tmp_path)
    for recipe in ("recipes/mnist1d.yaml", "mnist1d"):
        cfg = SweepConfig(recipe=recipe, batch_sizes=[16], target=0.5)
        args = trial_args(cfg, 16, {})
        assert args[:2] == ["--config", str(recipes_dir() / "mnist1d.yaml")], args
