"""Exact NQM risk against brute force: the scalar recurrence, the step-by-step second moments, Monte Carlo."""

import numpy as np
import pytest

from lightning_sgd.nqm import NQM, InterpolationModel, expected_risk, make_spectrum, risk, simulate_schedule
from lightning_sgd.nqm.core import lucas


def _recurrence(P, Q, T):
    f = np.zeros((T + 1,) + np.shape(P))
    f[1] = 1.0
    for t in range(1, T):
        f[t + 1] = P * f[t] - Q * f[t - 1]
    return f


def test_lucas_closed_form_matches_recurrence_including_critical_damping():
    rng = np.random.default_rng(0)
    P = np.r_[rng.uniform(-1.9, 1.9, 200), 2 * np.sqrt(0.81), -2 * np.sqrt(0.5), 1.2, 0.0, 0.7]
    Q = np.r_[rng.uniform(-0.9, 0.95, 200), 0.81, 0.5, 0.36 + 1e-13, 0.0, -0.3]  # disc = 0 and ≈ 0 cases
    ok = (np.abs(Q) < 1) & (np.abs(P) < 1 + Q)  # bounded sequences
    P, Q = P[ok], Q[ok]
    T = 80
    ref = _recurrence(P, Q, T)
    got = lucas(P[None, :], Q[None, :], np.arange(T + 1)[:, None])
    # the recurrence accumulates ~T·eps relative error; 1e-9 of the sequence's scale is far above that
    scale = np.abs(ref).max(axis=0) + 1.0
    assert np.max(np.abs(got - ref) / scale) < 1e-9


@pytest.mark.parametrize(
    "kw, lr, power",
    [({}, 0.3, 0.0), ({}, 1.9, 0.0), ({}, 0.05, 0.5), ({"momentum": 0.9}, 0.05, 0.0),
     ({"momentum": (1 - np.sqrt(0.03)) ** 2}, 0.03, 0.0), ({"momentum": 0.5}, 2.5, 0.25),
     ({"ema": 0.95}, 0.3, 0.0), ({"ema": 0.7}, 1.9, 0.0), ({"ema": 0.99}, 0.05, 0.75)],
)
def test_closed_form_matches_step_by_step_second_moments(kw, lr, power):
    """Closed form (Lucas sequences) vs the 2×2 second-moment dynamic programme of App. B/D, per step."""
    spec = make_spectrum(1000, 40)
    T = 300
    dp = simulate_schedule(spec, np.full(T, lr), 8, precondition_power=power, **kw)
    cf = expected_risk(spec, lr, 8, np.arange(T + 1), precondition_power=power, **kw)
    np.testing.assert_allclose(cf, dp, rtol=1e-9)


def _monte_carlo(h, c, lr, B, T, runs, *, power=0.0, momentum=None, ema=None, seed=0):
    """Sample the actual NQM dynamics: g = Hθ + ε, Cov(ε) = C/B, P = H^p; returns the loss per run and step."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((runs, h.size))
    m = np.zeros_like(theta)
    avg = theta.copy()
    pinv = h ** (-power)
    losses = np.empty((T + 1, runs))
    losses[0] = 0.5 * (h * theta**2).sum(1)
    for t in range(T):
        g = pinv * (h * theta + np.sqrt(c / B) * rng.standard_normal(theta.shape))
        if momentum is not None:
            m = momentum * m + g
            theta = theta - lr * m
        else:
            theta = theta - lr * g
        out = theta
        if ema is not None:
            avg = ema * avg + (1 - ema) * theta
            out = avg
        losses[t + 1] = 0.5 * (h * out**2).sum(1)
    return losses


@pytest.mark.parametrize(
    "kw, lr",
    [({}, 0.5), ({"power": 0.5}, 0.3), ({"momentum": 0.8}, 0.15), ({"momentum": 0.6, "power": 0.5}, 0.2),
     ({"ema": 0.9}, 0.5), ({"ema": 0.8, "power": 0.5}, 0.3)],
)
def test_exact_risk_matches_monte_carlo(kw, lr):
    """20 000 sampled runs of d = 12 directions (h_i = 1/i, C = H, B = 2): the sample mean of the loss lies
    within 5 standard errors of the exact expected risk at every checked step (a false alarm at 5 SE has
    probability < 1e-6 per check; a wrong noise or momentum term is off by tens of SE)."""
    d, B, T, runs = 12, 2.0, 60, 20_000
    h = 1.0 / np.arange(1, d + 1)
    power = kw.pop("power", 0.0)
    losses = _monte_carlo(h, h, lr, B, T, runs, power=power, **kw)
    model = NQM(d, None)
    exact = model.risk(lr, B, np.arange(T + 1), precondition_power=power, **kw)
    checks = [1, 2, 5, 10, 30, 60]
    mean = losses[checks].mean(1)
    se = losses[checks].std(1) / np.sqrt(runs)
    assert np.all(np.abs(mean - exact[checks]) < 5 * se), (mean, exact[checks], se)


def test_momentum_equals_sgd_at_effective_lr_in_small_lr_limit():
    """Section 3.2: for small α, heavy-ball (α, β) behaves like SGD at α/(1 − β) (rate and steady state)."""
    model = NQM(1000, 40)
    beta, lr = 0.9, 1e-4
    t = np.unique(np.logspace(0, 6, 40).astype(int))
    mom = model.risk(lr, 1, t, momentum=beta)
    sgd = model.risk(lr / (1 - beta), 1, t)
    # the leading corrections are O(α h/(1 − β)) = 1e-3 relative; the early steps differ by the momentum
    # build-up (≈ 1/(1 − β) = 10 steps), which moves the risk by < 1% since each step changes it by < 1e-3
    np.testing.assert_allclose(mom, sgd, rtol=1e-2)
    # and the approximation fails at a large learning rate, where momentum pays off
    big = model.risk(0.5, 1e6, 200, momentum=beta), model.risk(5.0, 1e6, 200)
    assert not np.isclose(*big, rtol=0.1)


def test_risk_entry_point_constant_and_schedule():
    spec_kwargs = {"dim": 500, "bins": 20}
    r_const = risk(0.2, 4, [0, 10, 100], **spec_kwargs)
    traj = risk(np.full(100, 0.2), 4, **spec_kwargs)
    np.testing.assert_allclose(r_const, traj[[0, 10, 100]], rtol=1e-10)
    assert r_const[0] == pytest.approx(0.5 * np.sum(1.0 / np.arange(1, 501)), rel=1e-12)  # ½ tr(H) E[θ²]
    with pytest.raises(ValueError, match="steps"):
        risk(0.2, 4, **spec_kwargs)


def test_quantization_keeps_trace_and_initial_risk():
    full = make_spectrum(10_000, None)
    binned = make_spectrum(10_000, 100)
    assert binned.dim == 10_000 and binned.h.size <= 100
    assert binned.initial_risk == pytest.approx(full.initial_risk, rel=1e-12)
    assert np.sum(binned.n * binned.c) == pytest.approx(np.sum(full.c), rel=1e-12)


def test_interpolation_model_matches_monte_carlo_and_converges_exponentially():
    """Stochastic linear regression with x ~ N(0, diag h), clean labels, batch 4: exact risk vs 20 000 runs
    (5 SE, as above); then the model's defining property: the noise vanishes at the optimum."""
    d, B, lr, T, runs = 8, 4, 0.4, 40, 20_000
    h = 1.0 / np.arange(1, d + 1)
    rng = np.random.default_rng(1)
    dvec = rng.standard_normal((runs, d))
    losses = [0.5 * (h * dvec**2).sum(1)]
    for _ in range(T):
        x = rng.standard_normal((runs, B, d)) * np.sqrt(h)
        grad = np.einsum("rbi,rb->ri", x, np.einsum("rbi,ri->rb", x, dvec)) / B
        dvec = dvec - lr * grad
        losses.append(0.5 * (h * dvec**2).sum(1))
    losses = np.array(losses)
    model = InterpolationModel(d, None)
    exact = model.risk(lr, B, np.arange(T + 1))
    checks = [1, 3, 10, 20, 40]
    se = losses[checks].std(1) / np.sqrt(runs)
    assert np.all(np.abs(losses[checks].mean(1) - exact[checks]) < 5 * se)
    assert model.steady_state_risk(lr, B) == 0.0
    # exponential convergence: 100× lower target costs ~2× the steps, against ~100× for the NQM
    small = dict(dim=1000, bins=30)
    from lightning_sgd.nqm import steps_to_target

    interp = [steps_to_target(16, target=t, model="interpolation", warn_edges=False, **small).steps[0]
              for t in (1e-2, 1e-4)]
    nqm = [steps_to_target(16, target=t, warn_edges=False, **small).steps[0] for t in (1e-2, 1e-4)]
    assert interp[1] / interp[0] < 4 and nqm[1] / nqm[0] > 30


def test_schedule_builders():
    from lightning_sgd.nqm import linear_decay, piecewise_constant

    lr = linear_decay(1.0, 12, decay=0.1, decay_steps=10)  # α(t) = α₀(1 − 0.9 t/10) up to t = 10, then 0.1
    np.testing.assert_allclose(lr, [1.0, 0.91, 0.82, 0.73, 0.64, 0.55, 0.46, 0.37, 0.28, 0.19, 0.1, 0.1])
    pw = piecewise_constant([3.0, 2.0, 1.0], 10)
    assert pw.size == 10 and list(np.unique(pw)) == [1.0, 2.0, 3.0] and pw[0] == 3.0 and pw[-1] == 1.0
