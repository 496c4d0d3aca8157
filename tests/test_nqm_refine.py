"""The NQM's steps to target are the continuous optimum, not the grid's: ``steps_to_target`` (grid search, then
golden-section refinement on log α and log(1 − β)) against a brute-force search on a grid 15-20× finer, which is
itself an upper bound of the continuous optimum, on a grid of preconditioning powers and batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_sgd.nqm import NQM, risk, steps_to_target
from lightning_sgd.nqm.search import crossing_steps

MODEL = {"dim": 1000, "bins": 30}
POWERS = (0.0, 0.25, 0.5, 0.75)


@pytest.mark.parametrize("power", POWERS)
def test_sgd_steps_within_half_a_percent_of_a_fine_grid(power):
    bs = 2.0 ** np.arange(0, 21, 2)
    h1 = NQM(**MODEL).max_curvature(power)
    refined = steps_to_target(bs, precondition_power=power, warn_edges=False, **MODEL)
    grid = steps_to_target(bs, precondition_power=power, warn_edges=False, refine=False, **MODEL)
    # brute force: 4000 learning rates over the default range (20x the default density), every point tested
    fine = np.logspace(-7, np.log10(1.999), 4000) / h1
    brute = steps_to_target(bs, precondition_power=power, lr=fine, exhaustive=True, refine=False, warn_edges=False,
                            **MODEL)
    assert np.all(refined.steps <= brute.steps * 1.005)
    assert np.all(refined.steps <= grid.steps)  # never worse than the grid point it started from
    # the returned learning rates reach the target at exactly the returned steps (exact risk, closed form)
    at = risk(refined.lr, bs, refined.steps, precondition_power=power, **MODEL)
    before = risk(refined.lr, bs, refined.steps - 1, precondition_power=power, **MODEL)
    assert np.all(at <= 0.01) and np.all(before > 0.01)


@pytest.mark.parametrize("power", (0.0, 0.5))
def test_momentum_steps_within_half_a_percent_of_a_fine_grid(power):
    # Batch sizes up to 2^12, where the steps number in the hundreds or more. Beyond, tuned momentum reaches the
    # target in a few dozen underdamped steps whose risk oscillates around it, and "the first step below the target"
    # differs between neighbouring configurations by whole steps (0.5% is a fraction of one): not a useful check.
    bs = 2.0 ** np.arange(0, 13, 3)
    model = NQM(**MODEL)
    h1 = model.max_curvature(power)
    refined = steps_to_target(bs, precondition_power=power, momentum="tune", warn_edges=False, **MODEL)
    eff = np.logspace(-7, np.log10(4000.0), 1500) / h1  # 5x the default density of effective rates
    betas = 1.0 - np.logspace(0, -4, 96)  # 4x the default density of 1 - beta
    brute = model.steps_grid(bs, eff, betas, kind="momentum", precondition_power=power, exhaustive=True,
                             effective_lr=True)
    assert np.all(refined.steps <= brute.steps * 1.005), (refined.steps, brute.steps)


def test_crossing_steps_match_a_step_by_step_scan():
    model = NQM(**MODEL)
    lrs = np.array([0.02, 0.3, 1.5, 0.3]) / model.max_curvature(0.0)
    bs = np.array([256.0, 1024.0, 4096.0, 1.0])  # the last never gets below the target (its noise floor is above)
    # guesses off by up to 16x on purpose: the bracket search must find the crossing from either side
    guess = np.array([5000.0, 5000.0, 100.0, 10.0])
    steps, frac = crossing_steps(model.spectrum, 0.0, "sgd", lrs, None, bs, 0.01, guess)
    for i in range(3):  # the first step whose exact risk is at or below the target, by scanning every step
        risk = model.risk(lrs[i], bs[i], np.arange(1, 100_000))
        assert (risk <= 0.01).any()
        first = 1 + int(np.argmax(risk <= 0.01))
        assert steps[i] == first and first - 1 < frac[i] <= first
    assert np.isinf(steps[3]) and np.isinf(frac[3])
