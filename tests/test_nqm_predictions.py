"""NQM steps-to-target search against brute force, the paper's section-3.7 claims, schedules, fit and CLI."""

import numpy as np
import pytest

from lightning_sgd.nqm import (
    NQM,
    fit_to_measurement,
    lower_bound_steps,
    make_spectrum,
    optimal_lr,
    optimize_piecewise_constant,
    read_sweep_csv,
    simulate_schedule,
    steps_to_target,
)
from lightning_sgd.nqm.cli import main
from lightning_sgd.nqm.schedules import piecewise_constant

SMALL = {"dim": 1000, "bins": 30}
BS = 2.0 ** np.arange(0, 21, 4)  # 1, 16, ..., 2^20


def _first_hit_brute_force(model, lrs, aux, kind, bs, target, t_max=800):
    """Step-by-step second-moment DP (no closed form, no bisection) of every grid point up to t_max; the first
    step with risk ≤ target, minimised over the grid."""
    best = np.inf
    for a in (aux if aux is not None else [None]):
        kw = {kind: a} if kind != "sgd" else {}
        traj = simulate_schedule(model.spectrum, np.repeat(lrs[:, None], t_max, 1), bs, **kw)  # (n_lr, T+1)
        hit = traj[:, 1:] <= target
        if hit.any():
            best = min(best, 1 + np.argmax(hit[hit.any(1)], 1).min())
    return best


@pytest.mark.parametrize("kind, aux", [("sgd", None), ("momentum", np.array([0.0, 0.5, 0.8, 0.9, 0.95])),
                                       ("ema", np.array([0.0, 0.5, 0.9, 0.99]))])
def test_search_matches_brute_force_first_hit(kind, aux):
    """The vectorized bisection search (coarse-to-fine and exhaustive) equals a brute-force scan of every step
    of every grid point (exact integers: same closed-form risk, different search)."""
    model = NQM(**SMALL)
    lrs = np.logspace(-3, np.log10(1.99), 25)
    bs = np.array([256.0, 4096.0, 2.0**16])
    fast = model.steps_grid(bs, lrs, aux, kind=kind, target=0.05, coarse=(5, 2))
    full = model.steps_grid(bs, lrs, aux, kind=kind, target=0.05, exhaustive=True)
    brute = [_first_hit_brute_force(model, lrs, aux, kind, b, 0.05) for b in bs]
    assert np.all(np.isfinite(brute))
    np.testing.assert_array_equal(full.steps, brute)
    np.testing.assert_array_equal(fast.steps, brute)


def test_steps_to_target_api_and_argmin():
    r = steps_to_target([16.0, 4096.0], momentum="tune", **SMALL)
    assert r.steps.shape == (2,) and np.all(np.isfinite(r.steps))
    assert r.momentum is not None and r.ema is None
    np.testing.assert_allclose(r.effective_lr, r.lr / (1 - r.momentum))
    # the returned hyper-parameters reproduce the steps: risk(steps) ≤ target < risk(steps − 1)
    model = NQM(**SMALL)
    for i, b in enumerate(r.batch_size):
        hit = model.risk(r.lr[i], b, [r.steps[i] - 1, r.steps[i]], momentum=r.momentum[i])
        assert hit[1] <= 0.01 < hit[0]
    fixed = steps_to_target(16.0, lr=float(r.lr[0]) * 0.5, **SMALL)  # a fixed lr: no tuning
    assert fixed.steps[0] >= steps_to_target(16.0, **SMALL).steps[0]
    with pytest.raises(ValueError):
        steps_to_target(16, momentum=0.9, ema=0.9, **SMALL)
    assert lower_bound_steps(16, 0.01, 10_000) == pytest.approx(10_000 / (2 * 0.01 * 16))


@pytest.fixture(scope="module")
def paper_curves():
    """The paper's NQM (d = 10⁴, 100 bins, target 0.01) on batch sizes 2⁰, 2⁴, ..., 2²⁰."""
    out = {}
    for p in (0.0, 0.25, 0.5, 0.75):
        out[("sgd", p)] = steps_to_target(BS, precondition_power=p, warn_edges=False)
        out[("momentum", p)] = steps_to_target(BS, precondition_power=p, momentum="tune", warn_edges=False)
    out[("ema", 0.0)] = steps_to_target(BS, ema="tune", warn_edges=False)
    return out


def _critical(steps):
    """Smallest batch size whose steps are within 2× of the large-batch plateau."""
    return BS[np.argmax(steps <= 2 * steps[-1])]


def test_claim_critical_batch_size_grows_with_preconditioning(paper_curves):
    crit = [_critical(paper_curves[("sgd", p)].steps) for p in (0.0, 0.25, 0.5, 0.75)]
    assert all(a <= b for a, b in zip(crit, crit[1:])) and crit[-1] >= 16 * crit[0], crit
    crit_m = [_critical(paper_curves[("momentum", p)].steps) for p in (0.0, 0.25, 0.5, 0.75)]
    assert all(a <= b for a, b in zip(crit_m, crit_m[1:])), crit_m
    # every optimizer stays above the information-theoretic bound
    for r in paper_curves.values():
        assert np.all(r.steps >= lower_bound_steps(BS))


def test_claim_momentum_helps_only_at_large_batch(paper_curves):
    for p in (0.0, 0.25, 0.5, 0.75):
        sgd, mom = paper_curves[("sgd", p)].steps, paper_curves[("momentum", p)].steps
        assert mom[0] == pytest.approx(sgd[0], rel=0.03)  # B = 1: same steps (β is only a rescaled lr)
        assert mom[-1] < sgd[-1] / 1.5  # B = 2^20: momentum wins
        assert _critical(mom) >= _critical(sgd)
    assert paper_curves[("momentum", 0.0)].steps[-1] < paper_curves[("sgd", 0.0)].steps[-1] / 20


def test_claim_ema_helps_at_small_batch_and_not_at_large(paper_curves):
    sgd, ema = paper_curves[("sgd", 0.0)].steps, paper_curves[("ema", 0.0)].steps
    assert np.all(ema <= sgd)
    assert np.all(ema[:3] < 0.5 * sgd[:3])  # B ≤ 256: EMA more than halves the steps
    assert ema[-1] > 0.8 * sgd[-1]  # near-deterministic regime: little left to average away


def test_claim_optimal_lr_linear_in_batch_then_flat():
    bs = 2.0 ** np.arange(0, 9)
    lr = optimal_lr(bs, warn_edges=False)
    slope = np.polyfit(np.log2(bs), np.log2(lr), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.06)  # the lr grid has 8.8% steps
    big = optimal_lr(2.0 ** np.arange(16, 21), warn_edges=False)
    assert big.max() / big.min() < 1.2  # flat (at the stability limit 2/h₁) past the critical batch size
    # small batch: momentum's optimal effective lr equals plain SGD's (Fig. 14)
    eff = optimal_lr(bs[:4], momentum="tune", warn_edges=False)
    np.testing.assert_allclose(np.log2(eff), np.log2(lr[:4]), atol=0.3)


def test_optimized_schedule_beats_fixed_lr_and_respects_bound():
    spec = make_spectrum(**SMALL)
    b = 16.0
    fixed = steps_to_target(b, **SMALL)
    lb = int(np.ceil(lower_bound_steps(b, 0.01, spec.dim)))
    res = optimize_piecewise_constant(spec, b, lo=lb, hi=int(fixed.steps[0]), init_lr=float(fixed.lr[0]), rtol=0.02)
    assert lb <= res.steps < 0.5 * fixed.steps[0]
    assert np.all(res.lrs <= 2.0 / spec.h.max() + 1e-12)
    # the reported schedule really reaches the target (exact step-by-step DP)
    traj = simulate_schedule(spec, piecewise_constant(res.lrs, res.steps), b)
    assert traj[-1] == pytest.approx(res.risk, rel=1e-9) and traj[-1] <= 0.01
    assert res.lrs[-1] < res.lrs[0] / 4  # decays, as in Fig. 3c


def test_fit_recovers_scales_and_predicts(tmp_path):
    bs = 2.0 ** np.arange(2, 15)
    truth = 40.0 * steps_to_target(bs / 8.0, warn_edges=False, **SMALL).steps
    f = fit_to_measurement(bs, truth, **SMALL)
    assert f.batch_scale == pytest.approx(8.0, rel=0.05) and f.step_scale == pytest.approx(40.0, rel=0.05)
    assert f.rms_log_error < 0.02
    np.testing.assert_allclose(f.predict(bs), truth, rtol=0.05)
    mom = f.predict(bs, momentum="tune")
    assert np.all(mom <= f.predict(bs) * 1.03) and mom[-1] < f.predict(bs)[-1]
    # the sweep's CSV format: rows that did not reach the target are skipped
    path = tmp_path / "results.csv"
    path.write_text("batch_size,reached,best_steps,effective_lr\n8,True,900,0.1\n16,True,460,0.2\n"
                    "32,False,not reached,\n")
    b, s = read_sweep_csv(str(path))
    np.testing.assert_array_equal(b, [8, 16]) and np.testing.assert_array_equal(s, [900, 460])


def test_cli_steps_and_figure(tmp_path, capsys):
    assert main(["steps", "--batch-sizes", "1", "64", "--dim", "1000", "--bins", "30", "--momentum", "tune",
                 "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "momentum" in out.splitlines()[0] and len(out.splitlines()) == 3
    assert (tmp_path / "s.csv").read_text().startswith("batch_size,steps")
    assert main(["figures", "--out", str(tmp_path), "--only", "13", "--quick"]) == 0
    assert (tmp_path / "nqm_fig13.png").stat().st_size > 10_000
    rows = (tmp_path / "nqm_fig13.csv").read_text().splitlines()
    assert rows[0].startswith("figure,target") and len(rows) == 1 + 5 * 12


@pytest.mark.slow
def test_fast_search_equals_exhaustive_on_figure_3a_grid():
    """The default coarse-to-fine search returns the exact grid minimum on the paper's Figure 3a data."""
    bs = 2.0 ** np.arange(21)
    for p in (0.0, 0.25, 0.5, 0.75):
        for kw in ({}, {"momentum": "tune"}):
            fast = steps_to_target(bs, precondition_power=p, warn_edges=False, **kw)
            full = steps_to_target(bs, precondition_power=p, warn_edges=False, exhaustive=True, **kw)
            np.testing.assert_array_equal(fast.steps, full.steps)


@pytest.mark.slow
def test_cli_fit_on_a_sweep_csv(tmp_path, capsys):
    bs = 2.0 ** np.arange(3, 12)
    steps = 30 * steps_to_target(bs / 4, warn_edges=False).steps
    path = tmp_path / "results.csv"
    path.write_text("batch_size,reached,best_steps\n" + "".join(f"{int(b)},True,{int(s)}\n" for b, s in zip(bs, steps)))
    assert main(["fit", str(path), "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("batch_scale 4 ") and "step_scale 30 " in first
    assert (tmp_path / "nqm_fit.png").exists() and (tmp_path / "nqm_fit.csv").exists()
