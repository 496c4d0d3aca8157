"""Gradient noise scale: pure estimators against closed forms and Monte Carlo, and the callback's sources."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_sgd.noise_scale import fit_steps_vs_batch


def test_fit_steps_vs_batch_recovers_b_noise_from_noisy_points():
    # S(B) = 2000 (1 + 300/B) with 3% multiplicative noise at 7 batch sizes: the log-space fit recovers B_noise
    # within 5% (the noise level is what sweeps see between seeds; 5% is the tolerance).
    rng = np.random.default_rng(0)
    batch_sizes = 2.0 ** np.arange(4, 11)
    steps = 2000 * (1 + 300 / batch_sizes) * np.exp(0.03 * rng.standard_normal(batch_sizes.size))
    s_min, b_noise = fit_steps_vs_batch(batch_sizes, steps)
    assert abs(b_noise / 300 - 1) < 0.05
    assert abs(s_min / 2000 - 1) < 0.05


def test_fit_steps_vs_batch_exact_points_and_bad_input():
    s_min, b_noise = fit_steps_vs_batch([8, 32, 128, 512], [1000 * (1 + 100 / b) for b in (8, 32, 128, 512)])
    assert s_min == pytest.approx(1000, rel=1e-6) and b_noise == pytest.approx(100, rel=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        fit_steps_vs_batch([32, 32], [100, 110])
