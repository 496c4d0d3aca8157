"""The NQM search's speed-ups must not change its answers.

- Figure 3a's grid optimum (every batch size, both optimizers, four preconditioning powers): the steps and the
  argmin indices equal those recorded before the evaluator, the bisection and the crossing search were sped up.
- The shortcuts, each against the plain computation: grouped bisection against bisecting every lane, one
  ``crossing_steps`` call for many lanes against one call per lane, and momentum crossings against a step-by-step
  scan of the exact risk.
"""

from __future__ import annotations

import numpy as np
import pytest

from lightning_sgd.nqm import NQM, default_lr_grid, default_momentum_grid
from lightning_sgd.nqm.search import _bisect, build_plan, crossing_steps

BS = 2.0 ** np.arange(21)
# (kind, power) -> (steps, lr index, β index) of NQM().steps_grid on Figure 3a's default grids (-1: none), as computed
# by the search before it was sped up (lightning-sgd commit b523f1e).
FIGURE_3A_GRID = {
    ("sgd", 0.0): (
        [6043644, 3014923, 1506104, 753943, 378258, 190314, 96185, 49065, 25772, 14802, 10402, 8696, 7851, 7532,
         7390, 7322, 7289, 7273, 7265, 7080, 6863],
        [123, 132, 140, 148, 156, 164, 172, 180, 188, 194, 197, 198, 198, 198, 198, 198, 198, 198, 198, 199, 199],
        [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
    ),
    ("momentum", 0.0): (
        [6005122, 2997123, 1489435, 737548, 359807, 171543, 82286, 40695, 20208, 10204, 5132, 2546, 1270, 658, 343,
         228, 187, 177, 173, 160, 164],
        [128, 136, 145, 153, 162, 171, 179, 187, 196, 205, 213, 222, 230, 238, 246, 250, 251, 251, 251, 252, 252],
        [23, 23, 23, 23, 23, 23, 22, 21, 19, 17, 16, 14, 12, 10, 9, 8, 8, 8, 8, 8, 8],
    ),
    ("sgd", 0.25): (
        [2378363, 1190324, 596544, 298211, 148797, 74400, 37272, 18711, 9416, 4749, 2433, 1335, 963, 856, 818, 801,
         794, 790, 788, 787, 787],
        [108, 116, 124, 133, 141, 149, 157, 165, 174, 182, 189, 196, 198, 198, 198, 198, 198, 198, 198, 198, 198],
        [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
    ),
    ("momentum", 0.25): (
        [2363252, 1173769, 577396, 280103, 129247, 62943, 31471, 15993, 7930, 3943, 1976, 1004, 494, 248, 130, 77,
         60, 57, 54, 53, 51],
        [112, 120, 129, 137, 146, 155, 163, 172, 180, 189, 197, 205, 214, 223, 231, 237, 237, 237, 237, 237, 238],
        [23, 23, 23, 23, 23, 22, 20, 18, 17, 15, 13, 12, 10, 8, 6, 6, 5, 5, 5, 5, 5],
    ),
    ("sgd", 0.5): (
        [1392060, 697255, 349695, 174210, 86984, 43512, 21800, 10928, 5448, 2723, 1364, 686, 346, 177, 108, 95, 90,
         89, 88, 87, 87],
        [88, 96, 104, 113, 121, 129, 137, 146, 154, 162, 170, 178, 186, 194, 198, 198, 198, 198, 198, 198, 198],
        [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
    ),
    ("momentum", 0.5): (
        [1373684, 677250, 328432, 152112, 72480, 36798, 18105, 8975, 4555, 2298, 1124, 562, 288, 141, 71, 37, 22, 19,
         19, 18, 18],
        [91, 100, 108, 117, 126, 134, 142, 151, 160, 167, 176, 185, 193, 202, 211, 219, 223, 225, 223, 225, 225],
        [23, 23, 23, 23, 22, 20, 19, 17, 15, 14, 12, 10, 8, 7, 5, 4, 3, 3, 3, 3, 3],
    ),
    ("sgd", 0.75): (
        [1050234, 524529, 262487, 131565, 65838, 32812, 16393, 8205, 4114, 2058, 1026, 513, 257, 129, 65, 33, 17, 12,
         11, 11, 11],
        [66, 74, 82, 90, 99, 107, 115, 123, 131, 140, 148, 156, 164, 172, 180, 188, 195, 197, 197, 197, 197],
        [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
    ),
    ("momentum", 0.75): (
        [1026569, 502606, 237877, 104165, 53714, 26342, 13016, 6545, 3366, 1632, 815, 413, 207, 101, 52, 26, 14, 8,
         6, 6, 6],
        [68, 77, 85, 94, 103, 111, 119, 128, 136, 145, 153, 162, 170, 179, 187, 195, 203, 207, 211, 211, 211],
        [23, 23, 23, 23, 21, 20, 18, 16, 15, 13, 11, 9, 8, 6, 4, 3, 2, 1, 1, 1, 1],
    ),
}


@pytest.mark.parametrize(("kind", "power"), list(FIGURE_3A_GRID))
def test_figure_3a_grid_optimum_is_unchanged(kind, power):
    model = NQM()
    lrs = default_lr_grid(model.max_curvature(power), kind=kind)
    aux = default_momentum_grid() if kind == "momentum" else None
    res = model.steps_grid(BS, lrs, aux, kind=kind, precondition_power=power, effective_lr=kind == "momentum")
    steps, lr_index, aux_index = FIGURE_3A_GRID[(kind, power)]
    assert np.array_equal(np.where(np.isfinite(res.steps), res.steps, -1), steps)
    assert np.array_equal(res.lr_index, lr_index) and np.array_equal(res.aux_index, aux_index)


def test_grouped_bisection_finds_each_groups_minimum_and_every_lane_attaining_it():
    model = NQM(dim=1000, bins=30)
    lrs = default_lr_grid(model.max_curvature(0.0), kind="momentum")
    plan = build_plan(model.spectrum, 0.0, lrs, default_momentum_grid(), "momentum", effective_lr=True)
    rng = np.random.default_rng(0)
    bs = np.repeat(2.0 ** np.arange(0, 13, 3), 60)  # 5 groups (batch sizes) of 60 configurations
    group = np.repeat(np.arange(5), 60)
    cfg = rng.choice(np.flatnonzero(plan.stable_cfg & (plan.noise_inf < 0.005)), bs.size)
    # brackets of different widths within a group, so that lanes do not all move in step
    first = _bisect(plan, cfg, bs, np.zeros(bs.size), np.full(bs.size, 2.0**24), 0.01)
    lo = np.floor(first * rng.uniform(0.0, 0.9, bs.size))
    hi = np.minimum(np.ceil(first * rng.uniform(1.0, 8.0, bs.size)), 2.0**24)
    det, noise = plan.det_noise(cfg, np.maximum(lo, 1.0))
    valid = (first < 2.0**24) & ((lo == 0) | (det + noise / bs > 0.01))
    det, noise = plan.det_noise(cfg, hi)
    valid &= det + noise / bs <= 0.01  # (a bisection's precondition: above the target at lo, at or below at hi)
    cfg, bs, group, lo, hi = cfg[valid], bs[valid], group[valid], lo[valid], hi[valid]
    plain = _bisect(plan, cfg, bs, lo, hi, 0.01)
    grouped = _bisect(plan, cfg, bs, lo, hi, 0.01, group=group)
    for g in range(5):
        lanes = group == g
        assert lanes.sum() >= 15
        best = plain[lanes].min()
        assert grouped[lanes].min() == best
        assert np.array_equal(plain[lanes] == best, grouped[lanes] == best)  # the same lanes attain it
        assert np.all(grouped[lanes][plain[lanes] > best] > best)  # the others report more, never less
    assert np.sum(grouped != plain) > 0  # (and some lanes did stop early)


def test_grouped_bisection_at_the_edges_of_the_groups_minimum():
    # lanes whose lower end sits exactly at, or one below, the group's best upper end: the first can only lose,
    # the second may still tie (same configuration) or lose (a slower one); "lose" must report more than the minimum
    model = NQM(dim=1000, bins=30)
    plan = build_plan(model.spectrum, 0.0, np.array([0.5, 0.05]) / model.max_curvature(0.0), None, "sgd")
    fast, slow = _bisect(plan, np.array([0, 1]), np.full(2, 256.0), np.zeros(2), np.full(2, 2.0**24), 0.01)
    assert slow > fast + 2
    cfg = np.array([0, 0, 1, 1, 1])
    lo = np.array([0.0, fast - 1, fast, fast - 1, fast - 2])
    hi = np.array([fast, fast + 5, 2 * slow, 2 * slow, 2 * slow])
    grouped = _bisect(plan, cfg, np.full(5, 256.0), lo, hi, 0.01, group=np.zeros(5, dtype=int))
    assert grouped[0] == grouped[1] == fast  # both lanes of the fast configuration attain the minimum
    assert np.all(grouped[2:] > fast)  # the slow one's lanes stop early, reporting more than the minimum
    assert np.array_equal(_bisect(plan, cfg, np.full(5, 256.0), lo, hi, 0.01), [fast, fast, slow, slow, slow])


def test_crossing_steps_of_a_lane_do_not_depend_on_the_other_lanes():
    # refine evaluates several points per lane in one call: each lane's answer must be the one it gets alone
    model = NQM(dim=1000, bins=30)
    h1 = model.max_curvature(0.0)
    lrs = np.array([0.05, 0.3, 1.0, 2.0, 0.5]) / h1
    betas = np.array([0.9, 0.5, 0.99, 0.95, 0.0])
    bs = np.array([16.0, 256.0, 1.0, 4096.0, 64.0])
    guess = np.array([3000.0, 400.0, 9000.0, 50.0, 700.0])
    together = crossing_steps(model.spectrum, 0.0, "momentum", lrs, betas, bs, 0.01, guess)
    for i in range(lrs.size):
        alone = crossing_steps(model.spectrum, 0.0, "momentum", lrs[i:i + 1], betas[i:i + 1], bs[i:i + 1], 0.01,
                               guess[i:i + 1])
        assert together[0][i] == alone[0][0] and together[1][i] == alone[1][0]


def test_momentum_crossing_steps_match_a_step_by_step_scan():
    # heavy-ball lanes with guesses off by up to 3.5x either way. The first three decay monotonically around their
    # crossing, so the search must return the first step at or below the target; the last is underdamped (its risk
    # oscillates as it crosses), where any crossing is a valid answer (module docstring): it must be one.
    model = NQM(dim=1000, bins=30)
    h1 = model.max_curvature(0.0)
    lrs = np.array([0.1, 0.5, 0.2, 0.02]) / h1
    betas = np.array([0.5, 0.8, 0.9, 0.99])
    bs = np.array([256.0, 2048.0, 512.0, 4096.0])
    guess = np.array([2000.0, 150.0, 3000.0, 400.0])
    steps, frac = crossing_steps(model.spectrum, 0.0, "momentum", lrs, betas, bs, 0.01, guess)
    for i in range(lrs.size):
        risk = model.risk(lrs[i], bs[i], np.arange(1, 8000), momentum=betas[i])  # risk[j] at step j + 1
        s = int(steps[i])
        assert risk[s - 1] <= 0.01 < risk[s - 2] and s - 1 < frac[i] <= s
        if i < 3:
            assert s == 1 + int(np.argmax(risk <= 0.01))
