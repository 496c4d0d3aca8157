"""Bad input to the NQM is refused before any work, with an error naming the argument or file; results files are
written atomically.

One table per surface: the Python API (every public function and argument), the ``lightning-sgd nqm`` CLI (every
subcommand and flag: exit status 2, one ``error:`` line, no traceback), sweep CSVs that are truncated or malformed,
and writes interrupted half-way.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from lightning_sgd import _files
from lightning_sgd.nqm import (
    NQM,
    InterpolationModel,
    Spectrum,
    constant,
    default_ema_grid,
    default_lr_grid,
    default_momentum_grid,
    expected_risk,
    figures,
    fit_to_measurement,
    linear_decay,
    lower_bound_steps,
    make_model,
    make_spectrum,
    optimal_lr,
    optimize_piecewise_constant,
    piecewise_constant,
    read_sweep_csv,
    risk,
    simulate_schedule,
    steady_state_risk,
    steps_to_target,
)
from lightning_sgd.nqm.cli import FIGURE_IDS, main
from lightning_sgd.nqm.figures import make_figures
from lightning_sgd.nqm.fit import NQMFit
from lightning_sgd.nqm.schedules import piece_lengths, piecewise_risk
from lightning_sgd.nqm.search import grid_steps
from lightning_sgd.sweep import results as sweep_results
from lightning_sgd.sweep.config import SweepConfig

TINY = {"dim": 50, "bins": 10}
SPEC = make_spectrum(**TINY)
NAN, INF = float("nan"), float("inf")
OUT = os.path.join(tempfile.gettempdir(), "nqm-bad-input-never-written")  # every call below fails before writing
FIT = NQMFit(batch_scale=2.0, step_scale=3.0, rms_log_error=0.0, model_kwargs={"target": 0.01, **TINY})


def sgd_grid(**kw):
    args = {"batch_sizes": [4.0], "lrs": [0.1], "aux": None, "kind": "sgd", "target": 0.1}
    return grid_steps(SPEC, **{**args, **kw})


# (id, call, error type, text the message must contain: the argument's name)
API_CASES = [
    # steps_to_target / optimal_lr: every argument
    ("steps-batch-negative", lambda: steps_to_target([4, -4], **TINY), ValueError, "batch_size"),
    ("steps-batch-zero", lambda: steps_to_target(0, **TINY), ValueError, "batch_size"),
    ("steps-batch-inf", lambda: steps_to_target([INF], **TINY), ValueError, "batch_size"),
    ("steps-batch-nan", lambda: steps_to_target([NAN], **TINY), ValueError, "batch_size"),
    ("steps-batch-empty", lambda: steps_to_target([], **TINY), ValueError, "batch_size"),
    ("steps-batch-str", lambda: steps_to_target("16", **TINY), TypeError, "batch_size"),
    ("steps-batch-bool", lambda: steps_to_target(True, **TINY), TypeError, "batch_size"),
    ("steps-optimizer", lambda: steps_to_target(4, optimizer="adam", **TINY), ValueError, "optimizer"),
    ("steps-power-neg", lambda: steps_to_target(4, precondition_power=-0.1, **TINY), ValueError, "precondition_power"),
    ("steps-power-big", lambda: steps_to_target(4, precondition_power=1.5, **TINY), ValueError, "precondition_power"),
    ("steps-power-nan", lambda: steps_to_target(4, precondition_power=NAN, **TINY), ValueError, "precondition_power"),
    ("steps-power-bool", lambda: steps_to_target(4, precondition_power=True, **TINY), TypeError, "precondition_power"),
    ("steps-momentum-one", lambda: steps_to_target(4, momentum=1.0, **TINY), ValueError, "momentum"),
    ("steps-momentum-neg", lambda: steps_to_target(4, momentum=-0.5, **TINY), ValueError, "momentum"),
    ("steps-momentum-grid", lambda: steps_to_target(4, momentum=[0.5, 1.2], **TINY), ValueError, "momentum"),
    ("steps-momentum-word", lambda: steps_to_target(4, momentum="auto", **TINY), ValueError, "momentum"),
    ("steps-ema-one", lambda: steps_to_target(4, ema=1.0, **TINY), ValueError, "ema"),
    ("steps-ema-inf", lambda: steps_to_target(4, ema=INF, **TINY), ValueError, "ema"),
    ("steps-both", lambda: steps_to_target(4, momentum=0.5, ema=0.5, **TINY), ValueError, "momentum and ema"),
    ("steps-lr-neg", lambda: steps_to_target(4, lr=-0.1, **TINY), ValueError, "lr"),
    ("steps-lr-zero", lambda: steps_to_target(4, lr=[0.0, 0.1], **TINY), ValueError, "lr"),
    ("steps-lr-none", lambda: steps_to_target(4, lr=None, **TINY), TypeError, "lr"),
    ("steps-lr-word", lambda: steps_to_target(4, lr="best", **TINY), ValueError, "lr"),
    ("steps-target-zero", lambda: steps_to_target(4, target=0.0, **TINY), ValueError, "target"),
    ("steps-target-neg", lambda: steps_to_target(4, target=-1, **TINY), ValueError, "target"),
    ("steps-target-nan", lambda: steps_to_target(4, target=NAN, **TINY), ValueError, "target"),
    ("steps-target-above-init", lambda: steps_to_target(4, target=100.0, **TINY), ValueError, "target"),
    ("steps-dim-zero", lambda: steps_to_target(4, dim=0, bins=10), ValueError, "dim"),
    ("steps-dim-float", lambda: steps_to_target(4, dim=50.0, bins=10), TypeError, "dim"),
    ("steps-dim-bool", lambda: steps_to_target(4, dim=True, bins=10), TypeError, "dim"),
    ("steps-bins-zero", lambda: steps_to_target(4, dim=50, bins=0), ValueError, "bins"),
    ("steps-bins-neg", lambda: steps_to_target(4, dim=50, bins=-3), ValueError, "bins"),
    ("steps-bins-float", lambda: steps_to_target(4, dim=50, bins=2.5), TypeError, "bins"),
    ("steps-model", lambda: steps_to_target(4, model="resnet", **TINY), ValueError, "model"),
    ("steps-exhaustive", lambda: steps_to_target(4, exhaustive="yes", **TINY), TypeError, "exhaustive"),
    ("steps-warn-edges", lambda: steps_to_target(4, warn_edges=1, **TINY), TypeError, "warn_edges"),
    ("steps-model-kwarg", lambda: steps_to_target(4, noise_scale=-1.0, **TINY), ValueError, "noise_scale"),
    ("steps-interp-momentum", lambda: steps_to_target(4, model="interpolation", momentum=0.5, **TINY),
     NotImplementedError, "momentum"),
    ("optimal-lr-batch", lambda: optimal_lr([-1.0], **TINY), ValueError, "batch_size"),
    ("optimal-lr-momentum", lambda: optimal_lr(4, momentum=2.0, **TINY), ValueError, "momentum"),
    # make_model and the grids
    ("make-model-name", lambda: make_model("quadratic"), ValueError, "model"),
    ("make-model-instance-kwargs", lambda: make_model(NQM(**TINY), noise_scale=2.0), ValueError, "noise_scale"),
    ("make-model-dim", lambda: make_model("nqm", dim=-1), ValueError, "dim"),
    ("lr-grid-curvature", lambda: default_lr_grid(0.0), ValueError, "max_curvature"),
    ("lr-grid-curvature-inf", lambda: default_lr_grid(INF), ValueError, "max_curvature"),
    ("lr-grid-kind", lambda: default_lr_grid(1.0, kind="adam"), ValueError, "kind"),
    ("lr-grid-n", lambda: default_lr_grid(1.0, n=0), ValueError, "n"),
    ("lr-grid-n-float", lambda: default_lr_grid(1.0, n=10.0), TypeError, "n"),
    ("momentum-grid-n", lambda: default_momentum_grid(0), ValueError, "n"),
    ("ema-grid-n", lambda: default_ema_grid(2.5), TypeError, "n"),
    # lower bound
    ("lower-bound-batch", lambda: lower_bound_steps(-8), ValueError, "batch_size"),
    ("lower-bound-target", lambda: lower_bound_steps(8, target=0), ValueError, "target"),
    ("lower-bound-dim", lambda: lower_bound_steps(8, dim=0), ValueError, "dim"),
    # risk (closed form and schedule)
    ("risk-lr-neg", lambda: risk(-0.1, 4, 10, **TINY), ValueError, "lr"),
    ("risk-lr-str", lambda: risk("0.1", 4, 10, **TINY), TypeError, "lr"),
    ("risk-batch", lambda: risk(0.1, 0, 10, **TINY), ValueError, "batch_size"),
    ("risk-steps-neg", lambda: risk(0.1, 4, -1, **TINY), ValueError, "steps"),
    ("risk-steps-frac", lambda: risk(0.1, 4, 2.5, **TINY), ValueError, "steps"),
    ("risk-steps-inf", lambda: risk(0.1, 4, INF, **TINY), ValueError, "steps"),
    ("risk-no-steps", lambda: risk(0.1, 4, **TINY), ValueError, "steps"),
    ("risk-schedule-neg", lambda: risk([0.1, -0.1], 4, **TINY), ValueError, "lr"),
    ("risk-schedule-batch-len", lambda: risk([0.1, 0.1, 0.1], [4, 8], **TINY), ValueError, "batch_size"),
    ("risk-power", lambda: risk(0.1, 4, 10, precondition_power=2, **TINY), ValueError, "precondition_power"),
    ("risk-momentum", lambda: risk(0.1, 4, 10, momentum=1.0, **TINY), ValueError, "momentum"),
    ("risk-ema", lambda: risk([0.1] * 3, 4, ema=-0.1, **TINY), ValueError, "ema"),
    ("risk-ema-array-schedule", lambda: risk([0.1] * 3, 4, ema=[0.5, 0.6], **TINY), TypeError, "ema"),
    # make_spectrum, Spectrum
    ("spectrum-dim", lambda: make_spectrum(0, 10), ValueError, "dim"),
    ("spectrum-dim-float", lambda: make_spectrum(50.5, 10), TypeError, "dim"),
    ("spectrum-bins", lambda: make_spectrum(50, 0), ValueError, "bins"),
    ("spectrum-h-neg", lambda: make_spectrum(h=[1.0, -1.0]), ValueError, "h"),
    ("spectrum-h-nan", lambda: make_spectrum(h=[1.0, NAN]), ValueError, "h"),
    ("spectrum-h-empty", lambda: make_spectrum(h=[]), ValueError, "h"),
    ("spectrum-c-neg", lambda: make_spectrum(h=[1.0, 0.5], c=[1.0, -1.0]), ValueError, "c"),
    ("spectrum-c-shape", lambda: make_spectrum(h=[1.0, 0.5], c=[1.0, 1.0, 1.0]), ValueError, "c"),
    ("spectrum-init-var", lambda: make_spectrum(**TINY, init_var=-1.0), ValueError, "init_var"),
    ("spectrum-decay", lambda: make_spectrum(**TINY, decay=NAN), ValueError, "decay"),
    ("spectrum-noise-scale", lambda: make_spectrum(**TINY, noise_scale=INF), ValueError, "noise_scale"),
    ("spectrum-class-h", lambda: Spectrum(np.array([1.0, 0.0]), np.ones(2), np.ones(2), np.ones(2)), ValueError,
     "Spectrum.h"),
    ("spectrum-class-shapes", lambda: Spectrum(np.ones(2), np.ones(3), np.ones(2), np.ones(2)), ValueError, "c"),
    ("spectrum-scaled-noise", lambda: SPEC.scaled(noise=-1.0), ValueError, "noise"),
    ("spectrum-scaled-curvature", lambda: SPEC.scaled(curvature=0.0), ValueError, "curvature"),
    # core closed forms
    ("expected-spec", lambda: expected_risk("nqm", 0.1, 4, 10), TypeError, "spec"),
    ("expected-lr", lambda: expected_risk(SPEC, 0.0, 4, 10), ValueError, "lr"),
    ("expected-batch", lambda: expected_risk(SPEC, 0.1, -4, 10), ValueError, "batch_size"),
    ("expected-steps", lambda: expected_risk(SPEC, 0.1, 4, [1, 2.5]), ValueError, "steps"),
    ("expected-momentum", lambda: expected_risk(SPEC, 0.1, 4, 10, momentum=[0.5, 1.0]), ValueError, "momentum"),
    ("steady-lr", lambda: steady_state_risk(SPEC, INF, 4), ValueError, "lr"),
    ("steady-power", lambda: steady_state_risk(SPEC, 0.1, 4, precondition_power=-1), ValueError,
     "precondition_power"),
    ("simulate-lrs-scalar", lambda: simulate_schedule(SPEC, 0.1, 4), ValueError, "lrs"),
    ("simulate-lrs-nan", lambda: simulate_schedule(SPEC, [0.1, NAN], 4), ValueError, "lrs"),
    ("simulate-batch", lambda: simulate_schedule(SPEC, [0.1, 0.1], [4, 0]), ValueError, "batch_size"),
    ("simulate-momentum", lambda: simulate_schedule(SPEC, [0.1], 4, momentum=1.0), ValueError, "momentum"),
    # the model classes and their methods
    ("nqm-dim", lambda: NQM(dim=-5, bins=10), ValueError, "dim"),
    ("nqm-spectrum", lambda: NQM(spectrum="paper"), TypeError, "spec"),
    ("nqm-max-curvature", lambda: NQM(**TINY).max_curvature(1.5), ValueError, "precondition_power"),
    ("nqm-risk-steps", lambda: NQM(**TINY).risk(0.1, 4, -3), ValueError, "steps"),
    ("nqm-steps-grid-aux", lambda: NQM(**TINY).steps_grid([4.0], [0.1], [1.0], kind="momentum", target=0.1),
     ValueError, "aux"),
    ("interp-label-noise", lambda: InterpolationModel(**TINY, label_noise=-1.0), ValueError, "label_noise"),
    ("interp-bins", lambda: InterpolationModel(dim=50, bins=0), ValueError, "bins"),
    ("interp-risk-lr", lambda: InterpolationModel(**TINY).risk(-0.1, 4, 10), ValueError, "lr"),
    ("interp-risk-batch", lambda: InterpolationModel(**TINY).risk([0.1, 0.1], [1, 2, 3]), ValueError, "batch_size"),
    ("interp-steady-batch", lambda: InterpolationModel(**TINY).steady_state_risk(0.1, NAN), ValueError,
     "batch_size"),
    ("interp-grid-target", lambda: InterpolationModel(**TINY).steps_grid([4.0], [0.1], target=-0.1), ValueError,
     "target"),
    ("interp-grid-batch", lambda: InterpolationModel(**TINY).steps_grid([INF], [0.1]), ValueError, "batch_sizes"),
    # grid_steps
    ("grid-spec", lambda: grid_steps(None, [4.0], [0.1]), TypeError, "spec"),
    ("grid-kind", lambda: sgd_grid(kind="adam"), ValueError, "kind"),
    ("grid-batch", lambda: sgd_grid(batch_sizes=[-4.0]), ValueError, "batch_sizes"),
    ("grid-lrs", lambda: sgd_grid(lrs=[0.1, -0.1]), ValueError, "lrs"),
    ("grid-aux-missing", lambda: sgd_grid(kind="momentum"), ValueError, "aux"),
    ("grid-aux-range", lambda: sgd_grid(kind="ema", aux=[0.5, 1.0]), ValueError, "aux"),
    ("grid-power", lambda: sgd_grid(power=NAN), ValueError, "power"),
    ("grid-target", lambda: sgd_grid(target=0.0), ValueError, "target"),
    ("grid-exhaustive", lambda: sgd_grid(exhaustive=None), TypeError, "exhaustive"),
    ("grid-effective-lr", lambda: sgd_grid(effective_lr="no"), TypeError, "effective_lr"),
    ("grid-coarse", lambda: sgd_grid(coarse=(0, 4)), ValueError, "coarse"),
    ("grid-coarse-shape", lambda: sgd_grid(coarse=10), TypeError, "coarse"),
    ("grid-per-octave", lambda: sgd_grid(per_octave=0), ValueError, "per_octave"),
    ("grid-n-centres", lambda: sgd_grid(n_centres=1.5), TypeError, "n_centres"),
    # schedules
    ("constant-lr", lambda: constant(-0.1, 10), ValueError, "lr"),
    ("constant-steps", lambda: constant(0.1, 10.0), TypeError, "steps"),
    ("constant-steps-zero", lambda: constant(0.1, 0), ValueError, "steps"),
    ("piece-lengths-total", lambda: piece_lengths(-1, 5), ValueError, "total_steps"),
    ("piece-lengths-pieces", lambda: piece_lengths(10, 0), ValueError, "pieces"),
    ("piecewise-values", lambda: piecewise_constant([0.1, NAN], 10), ValueError, "values"),
    ("piecewise-total", lambda: piecewise_constant([0.1], 0), ValueError, "total_steps"),
    ("linear-lr0", lambda: linear_decay(0.0, 10), ValueError, "lr0"),
    ("linear-total", lambda: linear_decay(0.1, True), TypeError, "total_steps"),
    ("linear-decay", lambda: linear_decay(0.1, 10, decay=1.5), ValueError, "decay"),
    ("linear-decay-steps", lambda: linear_decay(0.1, 10, decay_steps=0), ValueError, "decay_steps"),
    ("piecewise-risk-lrs", lambda: piecewise_risk(SPEC, [0.1, -0.1], 10, 4), ValueError, "lrs"),
    ("piecewise-risk-total", lambda: piecewise_risk(SPEC, [0.1], 0, 4), ValueError, "total_steps"),
    ("piecewise-risk-batch", lambda: piecewise_risk(SPEC, [0.1], 10, 0), ValueError, "batch_size"),
    ("piecewise-risk-power", lambda: piecewise_risk(SPEC, [0.1], 10, 4, precondition_power=3), ValueError,
     "precondition_power"),
    ("optimize-spec", lambda: optimize_piecewise_constant(None, 4), TypeError, "spec"),
    ("optimize-batch", lambda: optimize_piecewise_constant(SPEC, -4), ValueError, "batch_size"),
    ("optimize-target", lambda: optimize_piecewise_constant(SPEC, 4, target=-0.01), ValueError, "target"),
    ("optimize-pieces", lambda: optimize_piecewise_constant(SPEC, 4, pieces=0), ValueError, "pieces"),
    ("optimize-power", lambda: optimize_piecewise_constant(SPEC, 4, precondition_power=1.1), ValueError,
     "precondition_power"),
    ("optimize-lo", lambda: optimize_piecewise_constant(SPEC, 4, lo=0), ValueError, "lo"),
    ("optimize-hi", lambda: optimize_piecewise_constant(SPEC, 4, lo=10, hi=5), ValueError, "hi"),
    ("optimize-init-lr", lambda: optimize_piecewise_constant(SPEC, 4, init_lr=-1.0), ValueError, "init_lr"),
    ("optimize-rtol", lambda: optimize_piecewise_constant(SPEC, 4, rtol=1.0), ValueError, "rtol"),
    # fit
    ("fit-batch", lambda: fit_to_measurement([8, -16], [100, 50], **TINY), ValueError, "batch_sizes"),
    ("fit-batch-inf", lambda: fit_to_measurement([8, INF], [100, 50], **TINY), ValueError, "batch_sizes"),
    ("fit-steps-neg", lambda: fit_to_measurement([8, 16], [100, -50], **TINY), ValueError, "steps"),
    ("fit-steps-str", lambda: fit_to_measurement([8, 16], ["100", "50"], **TINY), TypeError, "steps"),
    ("fit-lengths", lambda: fit_to_measurement([8, 16, 32], [100, 50], **TINY), ValueError, "batch_sizes and steps"),
    ("fit-one-point", lambda: fit_to_measurement([8, 16], [100, INF], **TINY), ValueError, "batch sizes"),
    ("fit-reference", lambda: fit_to_measurement([8, 16], [100, 50], reference="sgd", **TINY), TypeError,
     "reference"),
    ("fit-reference-momentum", lambda: fit_to_measurement([8, 16], [100, 50], reference={"momentum": 1.0}, **TINY),
     ValueError, "momentum"),
    ("fit-target", lambda: fit_to_measurement([8, 16], [100, 50], target=0, **TINY), ValueError, "target"),
    ("fit-dim", lambda: fit_to_measurement([8, 16], [100, 50], dim=0), ValueError, "dim"),
    ("fit-bins", lambda: fit_to_measurement([8, 16], [100, 50], dim=50, bins=-1), ValueError, "bins"),
    ("fit-predict-batch", lambda: FIT.predict([-8]), ValueError, "batch_size"),
    ("fit-predict-optimizer", lambda: FIT.predict([8], momentum=1.5), ValueError, "momentum"),
    ("fit-critical-optimizer", lambda: FIT.critical_batch_size(ema=-1.0), ValueError, "ema"),
    ("read-csv-path", lambda: read_sweep_csv(None), TypeError, "path"),
    # figures
    ("figures-which", lambda: make_figures(OUT, ["3a", "99"]), ValueError, "99"),
    ("figures-which-empty", lambda: make_figures(OUT, []), ValueError, "which"),
    ("figures-quick", lambda: make_figures(OUT, ["13"], quick="yes"), TypeError, "quick"),
    ("figures-log", lambda: make_figures(OUT, ["13"], log="print"), TypeError, "log"),
    ("figures-out", lambda: make_figures(None, ["13"]), TypeError, "out"),
    ("figure-3a-target", lambda: figures.figure_3a(OUT, target=-1), ValueError, "target"),
    ("figure-3b-pieces", lambda: figures.figure_3b(OUT, pieces=0), ValueError, "pieces"),
    ("figure-13-targets", lambda: figures.figure_13(OUT, targets=(0.1, -0.1)), ValueError,
     "targets"),
    ("figure-14-quick", lambda: figures.figure_14(OUT, quick=None), TypeError, "quick"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_arguments_naming_them(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), str(info.value)


def test_the_table_covers_every_public_function():
    """Each function the package exports (and the public helpers of its modules) has at least one row above."""
    import inspect

    import lightning_sgd.nqm as nqm

    table = " ".join(inspect.getsource(c[1]) for c in API_CASES)
    exported = [n for n in nqm.__all__ if callable(getattr(nqm, n)) and not n.endswith("Result") and n != "NQMFit"]
    extra = ["piece_lengths", "piecewise_risk", "grid_steps", "predict", "critical_batch_size", "scaled",
             "max_curvature", "steps_grid", "steady_state_risk", "figure_3a", "figure_3b", "figure_13", "figure_14"]
    missing = [n for n in exported + extra if not re.search(rf"\b{n}\(", table)]
    assert not missing


def test_good_values_at_the_edges_of_the_ranges_are_accepted():
    """β = γ = 0, p = 0 and 1, fractional NQM batch sizes, a schedule with a zero-LR step: valid, and answered."""
    r = steps_to_target([0.5, 4], momentum=0.0, **TINY)
    assert np.all(np.isfinite(r.steps))
    assert np.isfinite(steps_to_target(4, ema=0.0, precondition_power=1.0, **TINY).steps).all()
    traj = risk([0.1, 0.0, 0.1], 4, **TINY)
    assert traj[2] == traj[1] and traj[3] < traj[2]
    np.testing.assert_allclose(risk(0.1, 4, np.array([5.0, 10.0]), **TINY), risk(0.1, 4, [5, 10], **TINY))


# ------------------------------------------------------------------------------------------------------------- CLI
CLI_CASES = [
    (["steps", "--batch-sizes", "16", "-4"], "--batch-sizes"),
    (["steps", "--batch-sizes", "0"], "--batch-sizes"),
    (["steps", "--batch-sizes", "inf"], "--batch-sizes"),
    (["steps", "--batch-sizes", "nan"], "--batch-sizes"),
    (["steps", "--batch-sizes", "sixteen"], "--batch-sizes"),
    (["steps", "--optimizer", "adam"], "--optimizer"),
    (["steps", "--momentum", "1"], "--momentum"),
    (["steps", "--momentum", "-0.1"], "--momentum"),
    (["steps", "--momentum", "auto"], "--momentum"),
    (["steps", "--ema", "1.0"], "--ema"),
    (["steps", "--ema", "nan"], "--ema"),
    (["steps", "--lr", "-0.1"], "--lr"),
    (["steps", "--lr", "0"], "--lr"),
    (["steps", "--lr", "1e400"], "--lr"),
    (["steps", "--power", "-0.5"], "--power"),
    (["steps", "--power", "1.5"], "--power"),
    (["steps", "--target", "0"], "--target"),
    (["steps", "--target", "-0.01"], "--target"),
    (["steps", "--target", "inf"], "--target"),
    (["steps", "--target", "50", "--dim", "50", "--bins", "10"], "target"),
    (["steps", "--dim", "0"], "--dim"),
    (["steps", "--dim", "100.5"], "--dim"),
    (["steps", "--bins", "0"], "--bins"),
    (["steps", "--bins", "-3"], "--bins"),
    (["steps", "--model", "resnet"], "--model"),
    (["steps", "--dim", "50", "--bins", "10", "--momentum", "0.5", "--ema", "0.5"], "momentum and ema"),
    (["steps", "--dim", "50", "--bins", "10", "--model", "interpolation", "--momentum", "tune"], "momentum"),
    (["steps", "--csv", "/nonexistent-folder/steps.csv"], "--csv"),
    (["figures", "--only", "99"], "--only"),
    (["figures", "--out", ""], "--out"),
    (["fit", "/nonexistent-folder/results.csv"], "csv"),
    (["fit", "{good}", "--reference", "adam"], "--reference"),
    (["fit", "{good}", "--reference", "momentum=1"], "--reference"),
    (["fit", "{good}", "--reference", "ema=-0.5"], "--reference"),
    (["fit", "{good}", "--target", "0"], "--target"),
    (["fit", "{good}", "--target", "1e9"], "target"),
    (["fit", "{good}", "--out", "{good}"], "--out"),
]


@pytest.fixture
def good_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("batch_size,reached,best_steps\n8,True,900\n16,True,460\n32,True,250\n")
    return str(path)


@pytest.mark.parametrize("argv, name", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_refuses_bad_flags_with_one_error_line(argv, name, good_csv, capsys):
    argv = [a.replace("{good}", good_csv) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and name in last, err
    assert "Traceback" not in err


def test_cli_figure_ids_are_the_figures():
    assert set(FIGURE_IDS) == set(figures.FIGURES)


def test_cli_figures_into_a_file_is_refused_before_any_figure(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["figures", "--out", str(blocker), "--only", "13", "--quick"])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    assert not list(tmp_path.glob("nqm_fig*"))


# ---------------------------------------------------------------------------------------------- truncated CSVs
HEADER = "batch_size,reached,best_steps,effective_lr\n"
BAD_CSVS = [
    ("empty", "", "empty"),
    ("blank", "\n\n", "empty"),
    ("header-only", HEADER, "no batch size reached"),
    ("missing-column", "batch_size,reached\n8,True\n16,True\n", "missing column(s) best_steps"),
    ("no-columns-we-know", "a,b\n1,2\n", "batch_size, best_steps"),
    ("half-written-last-line", HEADER + "8,True,900,0.1\n16,True,460,0.2\n32,Tr", "line 4"),
    ("cut-after-a-comma", HEADER + "8,True,900,0.1\n16,True,", "line 3"),
    ("extra-cells", HEADER + "8,True,900,0.1,7\n", "line 2"),
    ("non-numeric-steps", HEADER + "8,True,nine hundred,0.1\n16,True,460,0.2\n", "best_steps"),
    ("non-numeric-batch", HEADER + "eight,True,900,0.1\n16,True,460,0.2\n", "batch_size"),
    ("nan-batch", HEADER + "nan,True,900,0.1\n16,True,460,0.2\n", "batch_size"),
    ("negative-batch", HEADER + "-8,True,900,0.1\n16,True,460,0.2\n", "batch_size"),
    ("zero-steps", HEADER + "8,True,0,0.1\n16,True,460,0.2\n", "best_steps"),
    ("reached-garbage", HEADER + "8,maybe,900,0.1\n16,True,460,0.2\n", "reached"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text CSV"),
]


@pytest.mark.parametrize("content, message", [c[1:] for c in BAD_CSVS], ids=[c[0] for c in BAD_CSVS])
def test_read_sweep_csv_refuses_truncated_or_malformed_files(tmp_path, content, message):
    path = tmp_path / "results.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as info:
        read_sweep_csv(str(path))
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_read_sweep_csv_reads_the_sweeps_own_csv(tmp_path):
    """What ``lightning-sgd sweep`` writes (CRLF, 'not reached', blank extra columns) reads back; so does a CSV
    without a reached column, where 'not reached' in best_steps marks the misses."""
    summary = {"rows": [
        {"batch_size": b, "reached": s is not None, "best_steps": s, "effective_lr": None, "trials_nondivergent": 3,
         "trials_diverged": 0, "trials_reached": int(s is not None), "best_trial": 0, "edge_warnings": [],
         "best_params": {"lr": 0.1}} for b, s in ((8, 900), (16, 460), (32, None))]}
    path = tmp_path / "results.csv"
    sweep_results.write_csv(str(path), summary)
    b, s = read_sweep_csv(str(path))
    np.testing.assert_array_equal(b, [8, 16]) and np.testing.assert_array_equal(s, [900, 460])
    path.write_text("batch_size,best_steps\n32,not reached\n16,460\n8,900\n")
    b, s = read_sweep_csv(str(path))
    np.testing.assert_array_equal(b, [8, 16]) and np.testing.assert_array_equal(s, [900, 460])


def test_nqm_fit_on_a_truncated_csv_exits_2_naming_the_file(tmp_path):
    """The real command in a fresh process: one error line with the file and the line, exit status 2."""
    path = tmp_path / "results.csv"
    path.write_text(HEADER + "8,True,900,0.1\n16,True,460,0.2\n32,True,2")
    path.write_text(path.read_text()[:-4])  # the writer was killed mid-line: "32,Tr"
    proc = subprocess.run([sys.executable, "-m", "lightning_sgd.nqm.cli", "fit", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lightning-sgd nqm fit: error:") and str(path) in last and "line 4" in last


# -------------------------------------------------------------------------------------------------- atomic writes
def _interrupt_after_first_row(monkeypatch, cls):
    """Make ``cls.writerow`` write one data row, then fail as a full disk or a kill would."""
    original = cls.writerow
    calls = {"n": 0}

    def writerow(self, row):
        calls["n"] += 1
        if calls["n"] > 2:  # header, one row, then the failure
            raise OSError(28, "No space left on device")
        return original(self, row)

    monkeypatch.setattr(cls, "writerow", writerow)


def test_interrupted_nqm_csv_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "nqm_fit.csv"
    _files.write_csv(path, [{"batch_size": 1.0, "sgd": 10.0}, {"batch_size": 2.0, "sgd": 6.0}])
    before = path.read_bytes()
    _interrupt_after_first_row(monkeypatch, csv.DictWriter)
    with pytest.raises(OSError):
        _files.write_csv(path, [{"batch_size": float(b), "sgd": 1.0} for b in range(10)])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["nqm_fit.csv"]  # no temporary file left behind


def test_interrupted_cli_steps_csv_leaves_the_previous_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "steps.csv"
    path.write_text("batch_size,steps\n1,100\n")
    _interrupt_after_first_row(monkeypatch, csv.DictWriter)
    with pytest.raises(SystemExit) as info:
        main(["steps", "--batch-sizes", "1", "4", "16", "--dim", "50", "--bins", "10", "--csv", str(path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and str(path) in last and "No space left on device" in last
    assert path.read_text() == "batch_size,steps\n1,100\n"
    assert os.listdir(tmp_path) == ["steps.csv"]


def test_interrupted_sweep_results_write_leaves_the_previous_files(tmp_path, monkeypatch):
    """``lightning-sgd sweep``'s results.json and results.csv: a failure mid-write keeps the previous ones."""
    row = {"batch_size": 8, "reached": True, "best_steps": 900, "effective_lr": 0.1, "trials_nondivergent": 1,
           "trials_diverged": 0, "trials_reached": 1, "best_trial": 0, "edge_warnings": [], "best_params": {"lr": 0.1}}
    summary = {"rows": [row, {**row, "batch_size": 16}, {**row, "batch_size": 32}]}
    csv_path, json_path = tmp_path / "results.csv", tmp_path / "results.json"
    sweep_results.write_csv(str(csv_path), summary)
    json_path.write_text('{"rows": []}')
    csv_before = csv_path.read_bytes()

    real_writer = csv.writer

    class DyingWriter:  # csv.writer's object is a C type: wrap it instead of patching it
        def __init__(self, f, *args, **kwargs):
            self.inner, self.rows = real_writer(f, *args, **kwargs), 0

        def writerow(self, cells):
            self.rows += 1
            if self.rows > 2:
                raise OSError(28, "No space left on device")
            return self.inner.writerow(cells)

    monkeypatch.setattr(sweep_results.csv, "writer", DyingWriter)
    with pytest.raises(OSError):
        sweep_results.write_csv(str(csv_path), summary)

    def half_then_interrupted(obj, f, **kwargs):
        f.write(json.dumps(obj, **kwargs)[:20])
        raise KeyboardInterrupt  # a Ctrl-C mid-write

    monkeypatch.setattr(sweep_results.json, "dump", half_then_interrupted)
    cfg = SweepConfig(batch_sizes=[8, 16, 32], target=0.5, output_dir=str(tmp_path), wandb=False)
    with pytest.raises(KeyboardInterrupt):
        sweep_results.write_outputs(cfg, summary, quiet=True)
    assert csv_path.read_bytes() == csv_before and json_path.read_text() == '{"rows": []}'
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json"]


def test_atomic_write_keeps_the_usual_permissions(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("x\n")
    atomic = tmp_path / "atomic.csv"
    _files.write_csv(atomic, [{"x": 1}])
    assert atomic.read_bytes() == b"x\r\n1\r\n"
    assert os.stat(atomic).st_mode == os.stat(plain).st_mode
