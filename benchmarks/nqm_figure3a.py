"""Time to compute Figure 3a's data of Zhang et al. 2019 with the NQM, side by side with slower ways.

Figure 3a: 4 preconditioning powers × {plain SGD (200 learning rates), tuned momentum (300 effective learning
rates × 24 β)} × 21 batch sizes 2⁰..2²⁰, d = 10⁴ in 100 bins, target risk 0.01.

Three implementations in the same run:

- ``fast``: :func:`lightning_sgd.nqm.steps_to_target` (closed-form risk, coarse-to-fine grid search, bisection on t);
- ``exhaustive``: the same with ``exhaustive=True`` (every grid point tested: the exact grid minimum);
- ``naive``: a per-point Python loop that steps the exact second-moment recursion (eq. 3 / App. B eq. 21,
  vectorised over the bins only) until the risk reaches the target. Running it on the whole grid would take
  days, so it runs for real on a slice (every grid point at power 0.75, batch sizes 2¹⁶..2²⁰, where the
  steps are few) to check it agrees, and its full-grid time is extrapolated: measured seconds per step ×
  the number of steps it would take, summed over a random sample of grid points (each point stops at its own
  hit or at 2× the best steps of its batch size, which is generous to the naive loop).

    python benchmarks/nqm_figure3a.py [--repeats 3] [--sample 3000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lightning_sgd.nqm import NQM, default_lr_grid, default_momentum_grid, steps_to_target
from lightning_sgd.nqm.search import _bisect, _reached, build_plan

POWERS = (0.0, 0.25, 0.5, 0.75)
BS = 2.0 ** np.arange(21)


def figure_3a_data(exhaustive: bool, threads: int = 1, refine: bool = True) -> dict:
    """The 8 curves; with ``threads`` > 1 they run concurrently (numpy releases the GIL inside its kernels).
    ``refine=False``: the grid optimum only (no continuous refinement of the learning rate and β)."""
    jobs = {(kind, p): {"precondition_power": p, "exhaustive": exhaustive, "warn_edges": False, "refine": refine,
                        **({"momentum": "tune"} if kind == "momentum" else {})}
            for p in POWERS for kind in ("momentum", "sgd")}
    if threads <= 1:
        return {k: steps_to_target(BS, **kw) for k, kw in jobs.items()}
    with ThreadPoolExecutor(threads) as pool:
        futures = {k: pool.submit(steps_to_target, BS, **kw) for k, kw in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def naive_point(model: NQM, lr: float, bs: float, power: float, momentum: float | None, target: float,
                max_steps: int) -> float:
    """Step the exact second moments one step at a time (vectorised over bins) until risk ≤ target."""
    s = model.spectrum
    h_t = s.h ** (1.0 - power)
    noise = s.c * s.h ** (-2.0 * power) / bs
    w = 0.5 * s.h * s.n
    xx, yy, xy = s.init.copy(), np.zeros_like(s.h), np.zeros_like(s.h)
    a = 1.0 - lr * h_t
    for t in range(1, max_steps + 1):
        if momentum is None:
            xx = a * a * xx + lr * lr * noise
        else:
            b = momentum
            nxx = a * a * xx + (lr * b) ** 2 * yy - 2 * a * lr * b * xy + lr * lr * noise
            nyy = h_t * h_t * xx + b * b * yy + 2 * h_t * b * xy + noise
            xy = a * h_t * xx - lr * b * b * yy + (a * b - lr * b * h_t) * xy - lr * noise
            xx, yy = nxx, nyy
        if np.sum(w * xx) <= target:
            return float(t)
    return np.inf


def naive_grid(model, lrs, betas, bs, power, target, max_steps):
    best = np.inf
    for lr in lrs:
        for beta in betas:
            alpha = lr if beta is None else lr * (1 - beta)
            best = min(best, naive_point(model, alpha, bs, power, beta, target, int(max_steps)))
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=3000, help="grid points sampled for the naive extrapolation")
    ap.add_argument("--threads", type=int, default=2, help="threads for the fast run (the target is 2 cores)")
    args = ap.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; "
          f"load average {os.getloadavg()[0]:.1f} (shared CPU: other jobs were running)")

    figure_3a_data(False)  # warm-up (imports, caches)
    t_fast, c_fast, t_thr, c_grid = [], [], [], []
    for _ in range(args.repeats):
        c0 = time.process_time()
        grid_only = figure_3a_data(False, refine=False)
        c_grid.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        fast = figure_3a_data(False)
        t_fast.append(time.perf_counter() - t0)
        c_fast.append(time.process_time() - c0)
        t0 = time.perf_counter()
        threaded = figure_3a_data(False, args.threads)
        t_thr.append(time.perf_counter() - t0)
    assert all(np.array_equal(threaded[k].steps, fast[k].steps) for k in fast)
    t0, c0 = time.perf_counter(), time.process_time()
    full = figure_3a_data(True)
    t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    worst = max(float(np.max(fast[k].steps / full[k].steps - 1)) for k in fast)
    n_diff = sum(int(np.sum(fast[k].steps != full[k].steps)) for k in fast)

    # naive: real run on a slice ...
    model = NQM()
    target = 0.01
    p = 0.75
    sl = BS[16:]
    lrs_sgd = default_lr_grid(model.max_curvature(p))
    lrs_mom = default_lr_grid(model.max_curvature(p), kind="momentum")
    betas = default_momentum_grid()
    t0 = time.perf_counter()
    # step budget per point: 2x the best steps of that batch size (the same budget as the extrapolation)
    budget_sgd = 2 * fast[("sgd", p)].steps[16:]
    budget_mom = 2 * fast[("momentum", p)].steps[16:]
    naive_sgd = [naive_grid(model, lrs_sgd, [None], b, p, target, m) for b, m in zip(sl, budget_sgd)]
    naive_mom = [naive_grid(model, lrs_mom, betas, b, p, target, m) for b, m in zip(sl, budget_mom)]
    t_slice = time.perf_counter() - t0
    # the naive loop searches the same grids, so it must agree with the grid optimum (before the refinement)
    agree = np.array_equal(naive_sgd, grid_only[("sgd", p)].steps[16:]) and np.array_equal(
        naive_mom, grid_only[("momentum", p)].steps[16:])

    # ... seconds per naive step ...
    t0 = time.perf_counter()
    naive_point(model, 1e-9, 1.0, 0.0, 0.9, 0.0, 20_000)
    per_step_mom = (time.perf_counter() - t0) / 20_000
    t0 = time.perf_counter()
    naive_point(model, 1e-9, 1.0, 0.0, None, 0.0, 20_000)
    per_step_sgd = (time.perf_counter() - t0) / 20_000

    # ... and the number of steps the naive loop would run over the whole grid (sampled, exact per point)
    rng = np.random.default_rng(0)
    total_seconds = 0.0
    for kind, per_step in (("sgd", per_step_sgd), ("momentum", per_step_mom)):
        for p in POWERS:
            lrs = default_lr_grid(model.max_curvature(p), kind=kind)
            aux = betas if kind == "momentum" else None
            plan = build_plan(model.spectrum, p, lrs, aux, kind, effective_lr=kind == "momentum")
            n_cfg = plan.stable_cfg.size
            cfg = rng.integers(0, n_cfg, args.sample)
            bi = rng.integers(0, BS.size, args.sample)
            cap = 2 * fast[(kind, p)].steps[bi]
            ok = plan.stable_cfg[cfg] & (plan.noise_inf[cfg] / BS[bi] < target)
            steps = cap.copy()
            idx = np.flatnonzero(ok)
            reach = _reached(plan, cfg[idx], cap[idx], BS[bi[idx]], target)
            j = idx[reach]
            steps[j] = _bisect(plan, cfg[j], BS[bi[j]], np.zeros(j.size), cap[j], target)
            total_seconds += per_step * steps.mean() * n_cfg * BS.size

    tf, cf = float(np.median(t_fast)), float(np.median(c_fast))
    print("wall = elapsed seconds; cpu = this process's CPU seconds (what an idle machine would take, roughly)")
    print(f"fast (coarse-to-fine):   wall {tf:7.3f} s, cpu {cf:7.3f} s (median of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in t_fast)})")
    print(f"fast, {args.threads} threads:         wall {float(np.median(t_thr)):7.3f} s (median of {args.repeats})")
    saved = max(float(np.max(1 - fast[k].steps / grid_only[k].steps)) for k in fast)
    print(f"grid optimum only (refine=False): cpu {float(np.median(c_grid)):7.3f} s -> the continuous refinement costs "
          f"{float(np.median(c_fast)) / float(np.median(c_grid)):4.2f}x and saves up to {100 * saved:.1f}% of steps")
    print(f"exhaustive (vectorised): wall {t_full:7.3f} s, cpu {c_full:7.3f} s -> fast is {c_full / cf:5.1f}x faster; "
          f"fast vs exact grid minimum: {n_diff} of 168 points differ, worst +{100 * worst:.2f}% steps")
    print(f"naive per-point loop:    {total_seconds:8.0f} s  (= {total_seconds / 3600:.1f} h, extrapolated; "
          f"{1e6 * per_step_sgd:.1f} us/step SGD, {1e6 * per_step_mom:.1f} us/step momentum, wall) -> fast is "
          f"{total_seconds / tf:,.0f}x faster (wall/wall)")
    print(f"naive on the slice (power 0.75, B = 2^16..2^20, full grids): {t_slice:.1f} s; agrees with the grid "
          f"optimum: {agree}")


if __name__ == "__main__":
    main()
