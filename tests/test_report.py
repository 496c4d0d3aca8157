"""``lightning-sgd report``: panels from a tiny real run, and the recommendation's numbers against the formulas
applied by hand to the logged values (exact up to float rounding: the report does the same arithmetic)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_sgd.cli import run as cli_run
from lightning_sgd.report import examples_ratio, headline, recommend, scaled_lr, steps_ratio, write_report
from lightning_sgd.run_log import load_run
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_module

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_csv(path: Path, rows: list[dict[str, float]]) -> Path:
    keys = sorted({k for row in rows for k in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_closed_forms():
    # S(B) = S_min (1 + Bn/B): from B = 50 (3 S_min) to B = 100 (2 S_min); E(B) = E_min (1 + B/Bn): 1.5 -> 2
    assert steps_ratio(100.0, 50.0, 100.0) == pytest.approx(2 / 3)
    assert examples_ratio(100.0, 50.0, 100.0) == pytest.approx(4 / 3)
    assert scaled_lr(0.1, 100, 400, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 100, 400, "sqrt") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="rule"):
        scaled_lr(0.1, 100, 400, "cubic")


def test_recommendation_from_a_csv_with_standard_errors(tmp_path):
    """A CSV as the callbacks write it, with the standard-error keys; B_noise = inf at the last step is left out, and
    the recommendation uses the batch in force at its measurement (64), not the last one (128)."""
    rows = [
        {"step": 10, "gns/b_simple": 400.0, "gns/b_simple_se": 60.0, "gns/batch_size": 64.0, "gns/regime": -2.64},
        {"step": 10, "gns/b_noise": 150.0, "gns/b_noise_se": 30.0},
        {"step": 20, "gns/b_simple": 250.0, "gns/b_simple_se": 25.0, "gns/batch_size": 64.0, "gns/regime": -1.97},
        {"step": 20, "gns/b_noise": 180.0, "gns/b_noise_se": 20.0},
        {"step": 30, "gns/b_noise": math.inf, "gns/batch_size": 128.0},  # a batch-size schedule doubled it
        {"step": 30, "val/loss": 0.5, "val/acc": 0.8, "val_ema/loss": 0.45, "val_ema/acc": 0.82},
        {"step": 30, "bootstrap/real_test_error": 0.2, "bootstrap/ideal_test_error": 0.15, "bootstrap/gap": 0.05},
    ]
    folder = tmp_path / "run"
    _write_csv(folder / "metrics.csv", rows)
    config = {"model": {"init_args": {"optimizer": {"class_path": "torch.optim.SGD",
                                                    "init_args": {"lr": 0.05, "momentum": 0.9}}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    run = load_run(folder)
    rec = recommend(run)
    assert rec is not None and rec.source == "B_noise" and rec.unusable == 1
    assert (rec.step, rec.b_crit, rec.b_crit_se, rec.batch_size) == (20, 180.0, 20.0, 64.0)
    assert (rec.b_crit_start, rec.step_start, rec.batch) == (150.0, 10, 180)
    assert rec.lr == 0.05
    assert rec.lr_linear == pytest.approx(0.05 * 180 / 64)
    assert rec.lr_sqrt == pytest.approx(0.05 * math.sqrt(180 / 64))
    assert rec.steps_ratio == pytest.approx((1 + 180 / 180) / (1 + 180 / 64))  # 2 S_min vs 3.81 S_min
    assert rec.examples_ratio == pytest.approx((1 + 180 / 180) / (1 + 64 / 180))
    assert rec.regime.startswith("below B_noise: noise-dominated")  # 64 / 180 < 1/2
    text = " ".join(rec.lines())
    assert "180 ± 20" in text and "48% fewer steps" in text and "0.141 (linear rule)" in text
    lines = headline(run)
    assert lines[0] == "B_simple: 250 ± 25 at step 20 (training batch 64)"
    assert lines[1] == "B_noise: inf at step 30 (training batch 128)"
    assert [run.at_or_before("gns/batch_size", s) for s in (5, 20, 29, 30, 99)] == [64.0, 64.0, 64.0, 128.0, 128.0]
    assert any(line.startswith("bootstrap gap (real − ideal test error): 0.05") for line in lines)

    html = write_report(run).read_text()
    assert (folder / "report.html").is_file()
    pngs = sorted(p.stem for p in folder.glob("report_*.png"))
    assert pngs == ["report_bootstrap", "report_ema", "report_noise_scale", "report_recommendation", "report_regime"]
    assert "data:image/png;base64," in html and "Not measured in this run: curvature spectrum" in html
    assert "Not measured in this run: gradient diversity" in html and "deep bootstrap" not in html.split(
        "Not measured")[-1]


def test_a_run_without_measurements_gets_a_page_that_says_so(tmp_path):
    path = _write_csv(tmp_path / "metrics.csv", [{"step": 5, "val/loss": 1.0}, {"step": 10, "val/loss": 0.8}])
    html = write_report(path).read_text()
    assert recommend(load_run(path)) is None
    assert "No recommendation" in html and html.count("Not measured in this run") == 5  # alignment implied
    assert not list(tmp_path.glob("report_*.png"))


def test_bad_run_paths_are_named(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        cli_run(["report", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no run log"):
        cli_run(["report", str(tmp_path / "empty")])


def test_report_of_a_tiny_real_run_has_every_panel_and_the_logged_numbers(tmp_path, capsys):
    from lightning_sgd.callbacks import CurvatureSpectrum, GradientDiversity, GradientNoiseScale

    pl.seed_everything(0)
    callbacks = [GradientNoiseScale(schedule=2, b_noise_schedule=2),
                 GradientDiversity(schedule=4, probe_size=32),
                 CurvatureSpectrum(schedule=4, k=2, lanczos_iterations=6, trace_matvecs=6, frobenius_matvecs=3,
                                   alignment=True, probe_batch_size=32, matvec_budget=40)]
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=8, callbacks=callbacks, logger=logger, log_every_n_steps=1))
    trainer.fit(tiny_module(lr=0.05), datamodule=TinyDataModule(batch_size=16))
    logger.save()

    path = cli_run(["report", str(tmp_path)])  # the run folder: finds csv/version_0/metrics.csv
    assert path == Path(logger.log_dir) / "report.html"
    pngs = {p.stem.removeprefix("report_") for p in path.parent.glob("report_*.png")}
    assert {"noise_scale", "regime", "recommendation", "eigenvalues_hessian", "trace_hessian", "alignment_hessian",
            "diversity"} <= pngs
    html = path.read_text()
    assert "Not measured in this run: deep bootstrap" in html and "EMA vs raw" in html
    assert "Not measured in this run: curvature" not in html and "Not measured in this run: C ≈ H" not in html
    assert "Not measured in this run: gradient noise" not in html and "gradient diversity" not in html.split(
        "Not measured")[-1]

    # the recommendation, recomputed by hand from the CSV the callbacks wrote
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    b_noise = [(int(r["step"]), float(r["gns/b_noise"])) for r in rows if r.get("gns/b_noise")]
    usable = [(s, v) for s, v in b_noise if math.isfinite(v) and v > 0]
    assert usable, b_noise
    step, bn = usable[-1]
    batch = float(next(r["gns/batch_size"] for r in rows if r.get("gns/batch_size")))
    rec = recommend(load_run(path.parent))
    assert rec is not None and rec.b_crit == pytest.approx(bn) and rec.step == step and rec.batch_size == batch
    assert rec.batch == max(1, round(bn))
    assert rec.steps_ratio == pytest.approx((1 + bn / rec.batch) / (1 + bn / batch))
    assert rec.lr == pytest.approx(0.05)  # from sharpness / λ_max: no config.yaml beside this CSV
    assert rec.lr_linear == pytest.approx(0.05 * rec.batch / batch)
    out = capsys.readouterr().out
    assert f"report: {path}" in out and "critical batch ≈ B_noise" in out
    # the truncated points: the 40-product budget cuts nothing here, and the log says so
    assert all(float(r["curvature/hessian/truncated"]) == 0.0 for r in rows if r.get("curvature/hessian/truncated"))
    assert torch.isfinite(torch.tensor([v for _, v in usable])).all()


def test_truncated_points_are_marked_in_the_log_and_the_chart(tmp_path):
    from lightning_sgd.callbacks import CurvatureSpectrum

    pl.seed_everything(0)
    callback = CurvatureSpectrum(schedule=2, k=2, lanczos_iterations=10, trace_matvecs=6, matvec_budget=5)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[callback], logger=logger))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(batch_size=16))
    logger.save()
    run = load_run(Path(logger.log_dir))
    # 5 products: 1 probe + 4 Lanczos iterations of the 10 asked; the trace (6) does not fit
    assert run.values("curvature/hessian/truncated") == [1.0, 1.0]
    assert run.values("diag/curvature/hessian/lanczos_iterations") == [4.0, 4.0]
    assert run.values("diag/curvature/hessian/matvecs") == [5.0, 5.0]
    assert run.values("curvature/hessian/skipped_trace") == [1.0, 1.0]
    assert any("[truncated by the budget]" in line for line in headline(run))
    write_report(run)
    assert "Crosses mark measurements the budget truncated" in (Path(logger.log_dir) / "report.html").read_text()
