"""Standard errors of B_simple and B_noise: the delta-method SE of NoiseScaleEMA against Monte Carlo, its NaN/inf
cases, old checkpoint states, and the callback's logged keys."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_sgd.callbacks import GradientNoiseScale
from lightning_sgd.noise_scale import NoiseScaleEMA, NoiseScaleSample, per_example_estimate
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_module


def _synthetic_samples(replicates: int, steps: int, batch: int, dim: int, trace: float, seed: int) -> torch.Tensor:
    """(replicates, steps, 2) per-example (|G|², tr Σ) samples from gradients g_i = G + ε_i, |G|² = 1,
    ε_i ~ N(0, Σ) with Σ diagonal and uneven (tr Σ = ``trace``), so B_simple = ``trace``."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 1.5, dim, dtype=torch.float64)
    scales = scales * math.sqrt(trace / float(scales.pow(2).sum()))
    direction = torch.randn(dim, generator=gen, dtype=torch.float64)
    grad = direction / direction.norm()
    g = grad + scales * torch.randn(replicates, steps, batch, dim, generator=gen, dtype=torch.float64)
    m2 = g.pow(2).sum(-1).mean(-1)  # (R, T)
    mean_sq = g.mean(2).pow(2).sum(-1)
    out = torch.stack([(batch * mean_sq - m2) / (batch - 1), batch * (m2 - mean_sq) / (batch - 1)], dim=-1)
    # the vectorized formula is the library's per-example estimator
    first = per_example_estimate(g[0, 0].pow(2).sum(-1), g[0, 0].mean(0).pow(2).sum())
    assert (first.grad_sq_norm, first.trace_cov) == pytest.approx(out[0, 0].tolist(), rel=1e-12)
    return out


def _run_ema(samples: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    values, errors = [], []
    for replicate in samples.tolist():
        ema = NoiseScaleEMA(beta)
        for x, y in replicate:
            ema.update(NoiseScaleSample(x, y, 1.0, 16.0))
        values.append(ema.b_simple)
        errors.append(ema.b_simple_se)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(errors, dtype=torch.float64)


@pytest.mark.parametrize("beta, steps", [(0.9, 80), (0.5, 10)])
def test_b_simple_se_matches_the_monte_carlo_spread(beta, steps):
    # 400 independent runs of `steps` measurements (per-example estimator, batch 16, B_simple = 8): the standard
    # deviation of the final smoothed B_simple across runs vs the mean of the SE each run reports. Tolerance 15%:
    # the empirical std of 400 draws has a relative error of ~1/sqrt(2·399) = 3.5% (4 of them: 14%), the mean SE
    # ~1%, and the delta method's own bias is a few % at these sizes (measured 3-8% low for n_eff from 3 to 40
    # on this problem; it is larger with fewer measurements: 24% low after 6 updates of β = 0.8). Both cases have
    # teeth: with n_eff = t (the count) instead of W²/Σw² the SE would be 2x (β = 0.9, 80 updates) and 1.8x
    # (β = 0.5, 10 updates) too small.
    samples = _synthetic_samples(400, steps, 16, 8, 8.0, seed=1)
    values, errors = _run_ema(samples, beta)
    assert bool(torch.isfinite(errors).all())
    assert float(errors.mean()) == pytest.approx(float(values.std()), rel=0.15)


def test_b_noise_se_is_the_same_estimator():
    gns = GradientNoiseScale(beta=0.5)
    assert math.isnan(gns.b_simple_se) and math.isnan(gns.b_noise_se)
    for x, y in ((1.0, 3.0), (2.0, 5.0), (1.5, 2.0)):
        gns.b_noise_ema.update(NoiseScaleSample(x, y, 1, 2))
    assert gns.b_noise_se == gns.b_noise_ema.b_simple_se and math.isfinite(gns.b_noise_se)


def test_se_closed_form_on_three_samples():
    # β = 0.5, samples (x, y) = (1, 3), (2, 5), (1.5, 2): weights ∝ 1, 2, 4 (debiased: /7), so n_eff = 49/21.
    ema = NoiseScaleEMA(0.5)
    pairs = [(1.0, 3.0), (2.0, 5.0), (1.5, 2.0)]
    for x, y in pairs:
        ema.update(NoiseScaleSample(x, y, 1, 2))
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) / 7
    xs, ys = torch.tensor(pairs, dtype=torch.float64).T
    x_bar, y_bar = float(w @ xs), float(w @ ys)
    ratio = y_bar / x_bar
    n_eff = 1 / float(w.pow(2).sum())
    residual_var = float(w @ (ys - ratio * xs - (y_bar - ratio * x_bar)).pow(2)) / (1 - 1 / n_eff)
    expected = math.sqrt(residual_var / n_eff) / x_bar
    assert ema.effective_count == pytest.approx(n_eff, rel=1e-12)
    assert ema.b_simple == pytest.approx(ratio, rel=1e-12)
    assert ema.b_simple_se == pytest.approx(expected, rel=1e-9)


def test_se_is_nan_or_finite_never_an_error():
    ema = NoiseScaleEMA(0.9)
    assert math.isnan(ema.b_simple_se)  # no sample
    ema.update(NoiseScaleSample(1.0, 2.0, 1, 2))
    assert math.isnan(ema.b_simple_se)  # one sample: no spread
    ema.update(NoiseScaleSample(1.0, 2.0, 1, 2))
    assert ema.b_simple_se == 0.0  # identical samples: no spread
    single = NoiseScaleEMA(0.0)  # β = 0: the last sample carries all the weight
    for x in (1.0, 2.0, 3.0):
        single.update(NoiseScaleSample(x, 1.0, 1, 2))
    assert math.isnan(single.b_simple_se)
    noise_only = NoiseScaleEMA(0.5)  # |G|² ≤ 0 on average: B_simple = inf, its SE undefined
    for x in (-1.0, 0.5):
        noise_only.update(NoiseScaleSample(x, 3.0, 1, 2))
    assert noise_only.b_simple == math.inf and math.isnan(noise_only.b_simple_se)
    huge = NoiseScaleEMA(0.5)
    for x in (1e-300, 2e-300):
        huge.update(NoiseScaleSample(x, 1e300, 1, 2))
    assert math.isnan(huge.b_simple_se) or math.isfinite(huge.b_simple_se)


def test_old_states_without_the_spread_restart_it():
    ema = NoiseScaleEMA(0.8)
    for x, y in ((1.0, 3.0), (2.0, 5.0), (1.5, 2.0), (1.2, 4.0)):
        ema.update(NoiseScaleSample(x, y, 1, 2))
    state = ema.state_dict()
    old = {k: state[k] for k in ("beta", "grad_sq", "trace", "weight", "count")}
    restored = NoiseScaleEMA(0.8)
    restored.load_state_dict(old)
    assert restored.b_simple == ema.b_simple
    assert restored.effective_count == pytest.approx(ema.effective_count, rel=1e-12)  # Σw² for a constant β
    assert math.isnan(restored.b_simple_se)
    for x, y in ((1.1, 2.5), (0.9, 3.5)):
        restored.update(NoiseScaleSample(x, y, 1, 2))
    assert math.isfinite(restored.b_simple_se) and restored.b_simple_se > 0
    again = NoiseScaleEMA(0.8)
    again.load_state_dict(ema.state_dict())  # a new state round-trips exactly
    assert again.state_dict() == ema.state_dict() and again.b_simple_se == ema.b_simple_se


def test_callback_logs_the_standard_errors_at_the_measured_steps(tmp_path):
    gns = GradientNoiseScale(schedule=2, b_noise_schedule=2)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=7, callbacks=[gns],
                                               logger=CSVLogger(tmp_path, name="gns")))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=16))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key: sorted(int(r["step"]) for r in rows if r.get(key)) for key in
              ("gns/b_simple", "gns/b_simple_se", "gns/b_noise", "gns/b_noise_se")}
    assert logged["gns/b_simple"] == [0, 2, 4, 6]
    assert logged["gns/b_simple_se"] == [2, 4, 6]  # NaN (so not logged) after one measurement
    # B_noise is logged where its smoothed value is finite (a negative GᵀHG sample makes it inf), its SE on the
    # same rows from the second estimate on
    assert set(logged["gns/b_noise_se"]) <= set(logged["gns/b_noise"]) and 6 in logged["gns/b_noise_se"]
    assert gns.b_noise_ema.count == 4
    assert gns.last_metrics["gns/b_simple_se"] == gns.b_simple_se > 0
    assert gns.last_metrics["gns/b_noise_se"] == gns.b_noise_se > 0
