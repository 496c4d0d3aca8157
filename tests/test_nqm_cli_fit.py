"""``lightning-sgd nqm fit --reference``: each column is the optimizer it names (the "sgd" column once held the
reference optimizer's curve)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lightning_sgd.nqm import cli
from lightning_sgd.nqm.cli import main
from lightning_sgd.nqm.fit import fit_to_measurement


@pytest.mark.slow  # two NQM fits with tuned momentum: ~12 s of CPU
def test_fit_with_a_reference_prints_each_optimizer_under_its_own_name(tmp_path, capsys, monkeypatch):
    # two of the five predicted optimizers keep the test short; the code path is the same for each
    monkeypatch.setattr(cli, "PREDICTIONS", {k: cli.PREDICTIONS[k] for k in ("sgd", "momentum (tuned)")})
    batch_sizes, steps = [16, 64, 256, 1024], [4000, 1100, 400, 260]
    path = tmp_path / "results.csv"
    path.write_text("batch_size,reached,best_steps\n" + "".join(f"{b},True,{s}\n" for b, s in zip(batch_sizes, steps)))
    assert main(["fit", str(path), "--reference", "momentum=tune", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "nqm_fit.csv") as f:
        rows = list(csv.DictReader(f))
    grid = np.array([float(r["batch_size"]) for r in rows])
    fit = fit_to_measurement(batch_sizes, steps, reference={"momentum": "tune"})
    column = {name: np.array([float(r[name]) for r in rows]) for name in rows[0] if name != "batch_size"}
    np.testing.assert_allclose(column["sgd"], fit.predict(grid, precondition_power=0.0))
    np.testing.assert_allclose(column["measured: momentum=tune"], fit.predict(grid))
    np.testing.assert_allclose(column["momentum (tuned)"], fit.predict(grid))  # the reference is tuned momentum
    # plain SGD needs more steps than tuned momentum at the largest batch sizes (Zhang et al. 2019, Figure 3a)
    assert column["sgd"][-1] > column["momentum (tuned)"][-1]
    assert "measured: momentum=tune" in capsys.readouterr().out
