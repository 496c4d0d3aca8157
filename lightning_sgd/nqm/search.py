"""Steps to a target risk, minimised over a grid of (learning rate, β or γ), for many batch sizes at once.

The risk at step t of one configuration is Det(t) + Noise(t)/B (see :mod:`lightning_sgd.nqm.core`): neither
term depends on B. So evaluating a configuration at some t answers, for every batch size at once, whether the
target is reached by t: it is iff B ≥ B_needed(t) = Noise(t)/(target − Det(t)).

Search (``exhaustive=False``, the default):

1. every ``coarse``-th grid point is evaluated on a geometric grid of t (``per_octave`` points per doubling);
   per batch size this brackets the best coarse configuration's steps within a factor 2^(1/per_octave);
2. the configurations in the best bracket are bisected on integer t, giving an exact upper bound S(B);
3. two finer levels, around each batch size's best point and around the best coarse lr of its ``n_centres``
   best coarse β/γ columns: a neighbour is kept only if it reaches the target by S(B) − 1 (one evaluation),
   and is then bisected. This finds the grid minimum when the steps are unimodal around the optimum at the
   coarse resolution (on Figure 3a's grids it does, exactly; for EMA it can be a few % off);
   ``exhaustive=True`` applies the "reached by S(B) − 1?" test to every grid point, then bisects.

Steps are integers ≥ 1: the first t with risk ≤ target, assuming that once reached the risk stays below the
target. That holds when the risk decays monotonically; a strongly oscillating configuration (underdamped
momentum, or αh̃ > 1) can dip below the target early, and the bisection then reports a later crossing. The tests
compare against a step-by-step scan. inf means never (unstable, or steady-state risk above the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.core import Spectrum, _check_spectrum, _direction_terms, _sum_constants, optimizer_coefficients

T_MAX = 2.0**40  # give up beyond this many steps


_FIELDS = ("kappa", "A", "AQ2", "C", "noise_inf", "log_mod", "r1", "L", "x", "inv_w", "w_zero", "real",
           "sgn_neg", "psi", "cos_psi", "sin_psi", "inv_sin_psi")
_A, _AQ2, _C = (_FIELDS.index(f) for f in ("A", "AQ2", "C"))


class _Plan:
    """Per (configuration, bin) constants of the closed form, so that evaluating at t costs two exps per bin.

    Only the steady-state risk and stability are computed for the whole grid; the constants of the closed form
    are computed for the configurations a call asks for (the search touches a small part of the grid).
    """

    def __init__(self, coeffs, n_cfg: int, init, weight):
        # coeffs(rows) -> (P, Q, kappa, noise_unit), each (len(rows), k); init, weight: (k,)
        self.coeffs = coeffs
        self.wdet = weight * init  # (k,)
        self.weight = weight
        stable = np.zeros(n_cfg, dtype=bool)
        noise_inf = np.empty(n_cfg)
        step = max(1, 200_000 // weight.size)
        for s in range(0, n_cfg, step):
            rows = np.arange(s, min(s + step, n_cfg))
            P, Q, _, nu = coeffs(rows)
            s_inf, _, st = _sum_constants(P, Q)
            stable[rows] = st.all(axis=1)
            with np.errstate(invalid="ignore"):
                noise_inf[rows] = np.where(stable[rows], np.sum(weight * nu * np.where(st, s_inf, 0.0), axis=1),
                                           np.inf)
        self.stable_cfg, self.noise_inf = stable, noise_inf

    def fields(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), n_fields, k) constants of the closed form."""
        P, Q, kappa, noise_unit = self.coeffs(rows)
        s_inf, p_inf, stable = _sum_constants(P, Q)
        s_inf = np.where(stable, s_inf, 0.0)
        p_inf = np.where(stable, p_inf, 0.0)
        wnoise = np.where(stable, self.weight * noise_unit, 0.0)  # ½ h n ν² at B = 1
        Pa = np.abs(P)
        disc = Pa * Pa - 4.0 * Q
        with np.errstate(divide="ignore", invalid="ignore"):
            sq = np.sqrt(np.maximum(disc, 0.0))
            r1 = np.maximum(0.5 * (Pa + sq), 1e-300)  # dominant real root of x² − |P|x + Q
            w = np.minimum(sq / r1, 2.0)  # 1 − r2/r1
            x = 1.0 - w
            # log|x| accurately near x = 1 (critical damping), −inf at x = 0
            L = np.where(x > 0.5, np.log1p(-np.where(x > 0.5, w, 0.0)), np.log(np.abs(x)))
            rho = np.sqrt(np.maximum(Q, 1e-300))
            real = disc >= 0
            sin_psi = np.where(real, 1.0, np.sqrt(np.maximum(-disc, 0.0)) / (2.0 * rho))
            cos_psi = np.where(real, 1.0, Pa / (2.0 * rho))
        A = wnoise * s_inf
        noise_inf = np.broadcast_to(A.sum(axis=1, keepdims=True), Q.shape)  # (n, k), same value along k
        fields = {
            "kappa": kappa, "A": A, "AQ2": A * Q * Q, "C": 2.0 * wnoise * Q * p_inf, "noise_inf": noise_inf,
            "psi": np.arctan2(sin_psi, cos_psi),
            "log_mod": np.where(real, np.log(r1), np.log(rho)), "r1": np.where(real, r1, rho), "L": L, "x": x,
            "inv_w": np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 0.0), "w_zero": (w <= 0) * 1.0,
            "real": real * 1.0, "sgn_neg": (P < 0) * 1.0, "cos_psi": cos_psi, "sin_psi": sin_psi,
            "inv_sin_psi": 1.0 / sin_psi,
        }
        return np.stack([np.broadcast_to(fields[f], Q.shape) for f in _FIELDS], axis=1)

    def det_noise(self, cfg: np.ndarray, t: np.ndarray, data: np.ndarray | None = None):
        """(Det(t), Noise(t) at B = 1) for lanes (cfg[i], t[i, j]); cfg (n,), t (n, m) of integers ≥ 1.

        ``data`` = ``self.fields(cfg)`` when the caller already has it (bisection reuses it every round).
        """
        t = np.asarray(t, float)
        squeeze = t.ndim == 1
        t2 = t[:, None] if squeeze else t
        det = np.empty(t2.shape)
        noise = np.empty(t2.shape)
        if data is None:
            uniq, inv = np.unique(cfg, return_inverse=True)
            table = self.fields(uniq)
        else:
            table, inv = data, np.arange(cfg.size)
        chunk = max(1, 400_000 // (t2.shape[1] * table.shape[2]))
        for s in range(0, cfg.size, chunk):
            d, n = self._eval(table[inv[s:s + chunk]], t2[s:s + chunk])
            det[s:s + chunk], noise[s:s + chunk] = d, n
        return (det[:, 0], noise[:, 0]) if squeeze else (det, noise)

    def _eval(self, data: np.ndarray, t: np.ndarray):
        g = {f: data[:, i, None, :] for i, f in enumerate(_FIELDS)}  # each (n, 1, k)
        tt = t[:, :, None]  # (n, m, 1)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            odd = np.mod(tt, 2.0) == 1.0  # (n, m, 1)
            mod = np.exp((tt - 1.0) * g["log_mod"])  # r1^{t−1} or ρ^{t−1}
            # real roots: g_t = (1 − x^t)/w, g_{t+1} = 1 + x g_t ; x^t = sign^t · |x|^t
            gt = np.expm1(tt * g["L"])  # x^t − 1 for x ≥ 0
            if (g["x"] < 0).any():
                gt = np.where((g["x"] < 0) & odd, -2.0 - gt, gt)
            gt *= -g["inv_w"]
            if (g["w_zero"] > 0).any():
                gt = np.where(g["w_zero"] > 0, tt, gt)
            gt1 = 1.0 + g["x"] * gt
            cplx = g["real"] == 0.0
            if cplx.any():
                ang = np.where(cplx, tt * g["psi"], 0.0)
                st, ct = np.sin(ang), np.cos(ang)
                gt = np.where(cplx, st * g["inv_sin_psi"], gt)
                gt1 = np.where(cplx, (st * g["cos_psi"] + ct * g["sin_psi"]) * g["inv_sin_psi"], gt1)
            f_t = mod * gt
            f_t1 = mod * g["r1"] * gt1
            neg = g["sgn_neg"] > 0
            if neg.any():  # sgn^{t−1} on F_t and sgn^t on F_{t+1} when P < 0
                f_t = np.where(neg & ~odd, -f_t, f_t)
                f_t1 = np.where(neg & odd, -f_t1, f_t1)
            d = f_t1 - g["kappa"] * f_t
            det = (d * d) @ self.wdet
            # Σ wnoise (s∞ − tail) = noise∞ − Σ A F_{t+1}² − Σ A Q² F_t² + Σ C F_{t+1} F_t
            noise = (g["noise_inf"][:, :, 0] - np.einsum("nmk,nk->nm", f_t1 * f_t1, data[:, _A])
                     - np.einsum("nmk,nk->nm", f_t * f_t, data[:, _AQ2])
                     + np.einsum("nmk,nk->nm", f_t1 * f_t, data[:, _C]))
        return det, noise


def check_target(spec: Spectrum, target) -> float:
    """The target risk: finite, > 0 and below the initial risk (which is reached at step 0, before any search)."""
    target = check.real("target", target, check.POSITIVE)
    if target >= spec.initial_risk:
        raise ValueError(f"target {target:g} is not below the model's initial risk {spec.initial_risk:.6g}: it is "
                         f"met before the first step. Lower the target (the paper uses 0.01).")
    return target


def build_plan(spec: Spectrum, power: float, lrs, aux, kind: str, *, effective_lr: bool = False) -> _Plan:
    """Plan for the (lr × aux) grid (row index = i_lr * n_aux + i_aux)."""
    h_tilde, sigma2, weight = _direction_terms(spec, power)
    lrs = np.asarray(lrs, float)
    aux_arr = None if aux is None else np.asarray(aux, float)
    n_aux = 1 if aux is None else len(aux_arr)

    def coeffs(rows):
        i_lr, i_aux = np.divmod(rows, n_aux)
        lr = lrs[i_lr][:, None]
        a = None if aux_arr is None else aux_arr[i_aux][:, None]
        if effective_lr and kind == "momentum":
            lr = lr * (1.0 - a)
        kw = {"momentum": a} if kind == "momentum" else {"ema": a} if kind == "ema" else {}
        P, Q, kappa, nu = optimizer_coefficients(lr, h_tilde[None, :], **kw)
        shape = (rows.size, h_tilde.size)
        return tuple(np.broadcast_to(v, shape) for v in (P, Q, kappa, nu * lr * lr * sigma2[None, :]))

    return _Plan(coeffs, len(lrs) * n_aux, spec.init, weight)


def _reached(plan: _Plan, cfg: np.ndarray, t: np.ndarray, bs: np.ndarray, target: float, data=None) -> np.ndarray:
    det, noise = plan.det_noise(cfg, t, data)
    return det + noise / bs <= target


def _bisect(plan: _Plan, cfg: np.ndarray, bs: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: float):
    """Smallest integer t in (lo, hi] with risk ≤ target, given it holds at hi and not at lo (lo ≥ 0)."""
    lo, hi = np.asarray(lo, float).copy(), np.asarray(hi, float).copy()
    data = plan.fields(cfg)  # computed once, reused by every round
    # t = 1 might already do when lo = 0 (t = 0 is the initial risk, above the target by assumption)
    zero = (lo < 1) & (hi > 1)
    if zero.any():
        at1 = _reached(plan, cfg[zero], np.ones(zero.sum()), bs[zero], target, data[zero])
        hi[np.flatnonzero(zero)[at1]] = 1.0
        lo[zero] = np.maximum(lo[zero], 1.0)
    while True:
        idx = np.flatnonzero(hi - lo > 1)
        if idx.size == 0:
            return hi
        mid = np.floor((lo[idx] + hi[idx]) / 2)
        ok = _reached(plan, cfg[idx], mid, bs[idx], target, data[idx])
        hi[idx[ok]] = mid[ok]
        lo[idx[~ok]] = mid[~ok]


@dataclass
class GridResult:
    steps: np.ndarray  # (n_B,) minimal steps (inf if the target is never reached on the grid)
    lr_index: np.ndarray  # (n_B,) argmin index into the lr grid (−1 if none)
    aux_index: np.ndarray  # (n_B,) argmin index into the aux grid (−1 if none / no aux)


def _update(best, best_cfg, hits, cfg, b):
    order = np.lexsort((cfg, hits))  # ties: smallest config index (smallest lr, then smallest aux)
    for h, c, i in zip(hits[order], cfg[order], b[order]):
        if h < best[i] or (h == best[i] and c < best_cfg[i]):
            best[i], best_cfg[i] = h, c


def _improve(plan, cand_cfg, cand_b, batch_sizes, best, best_cfg, target):
    """Lanes (config, batch index) that reach the target before ``best`` are bisected; updates in place."""
    if cand_cfg.size == 0:
        return
    bs = batch_sizes[cand_b]
    ub = best[cand_b]
    t_test = np.where(np.isfinite(ub), ub - 1, T_MAX)
    keep = plan.stable_cfg[cand_cfg] & (plan.noise_inf[cand_cfg] / bs < target) & (t_test >= 1)
    cand_cfg, cand_b, bs, t_test = cand_cfg[keep], cand_b[keep], bs[keep], t_test[keep]
    if cand_cfg.size == 0:
        return
    ok = _reached(plan, cand_cfg, t_test, bs, target)
    cand_cfg, cand_b, bs, t_test = cand_cfg[ok], cand_b[ok], bs[ok], t_test[ok]
    if cand_cfg.size:
        hits = _bisect(plan, cand_cfg, bs, np.zeros(cand_cfg.size), t_test, target)
        _update(best, best_cfg, hits, cand_cfg, cand_b)


def _certify(plan, batch_sizes, best, best_cfg, target):
    """Every grid point against the current best (one evaluation per point and batch size, then bisection)."""
    cfg = np.flatnonzero(plan.stable_cfg)
    t_test = np.where(np.isfinite(best), best - 1, T_MAX)[None, :].repeat(cfg.size, 0)  # (n_cfg, n_B)
    feasible = (plan.noise_inf[cfg, None] / batch_sizes[None, :] < target) & (t_test >= 1)
    rows = np.flatnonzero(feasible.any(axis=1))
    if rows.size == 0:
        return
    det, noise = plan.det_noise(cfg[rows], np.maximum(t_test[rows], 1.0))
    ok = feasible[rows] & (det + noise / batch_sizes[None, :] <= target)
    ci, bi = np.nonzero(ok)
    if ci.size:
        c = cfg[rows][ci]
        hits = _bisect(plan, c, batch_sizes[bi], np.zeros(ci.size), t_test[rows][ci, bi], target)
        _update(best, best_cfg, hits, c, bi)


def grid_steps(
    spec: Spectrum,
    batch_sizes,
    lrs,
    aux=None,
    *,
    kind: str = "sgd",
    power: float = 0.0,
    target: float = 0.01,
    exhaustive: bool = False,
    coarse: tuple[int, int] = (10, 4),
    per_octave: int = 2,
    effective_lr: bool = False,
    n_centres: int = 3,
) -> GridResult:
    """Minimal steps to ``target`` over the (lrs × aux) grid for every batch size (see module docstring).

    With ``effective_lr=True`` (momentum) the lr grid holds α/(1 − β), so the grid point (i, j) is
    α = lrs[i]·(1 − aux[j]): along that axis the small-batch optimum is flat in β, which the local search likes.
    """
    _check_spectrum(spec)
    check.choice("kind", kind, ("sgd", "momentum", "ema"))
    batch_sizes = np.atleast_1d(check.reals("batch_sizes", batch_sizes, check.POSITIVE))
    lrs = np.atleast_1d(check.reals("lrs", lrs, check.POSITIVE))
    if (aux is None) != (kind == "sgd"):
        raise ValueError(f"aux (the β or γ grid) is needed for kind='momentum'/'ema' and unused for 'sgd'; got "
                         f"kind={kind!r} with aux={'None' if aux is None else 'an array'}.")
    if aux is not None:
        aux = np.atleast_1d(check.reals("aux", aux, check.UNIT_OPEN))
    check.real("power", power, check.UNIT)
    check_target(spec, target)
    check.flag("exhaustive", exhaustive)
    check.flag("effective_lr", effective_lr)
    if not isinstance(coarse, (tuple, list)) or len(coarse) != 2:
        raise TypeError(f"coarse must be a pair (lr stride, aux stride) of ints >= 1, got {coarse!r}.")
    coarse = (check.integer("coarse[0]", coarse[0]), check.integer("coarse[1]", coarse[1]))
    check.integer("per_octave", per_octave)
    check.integer("n_centres", n_centres)
    n_lr, n_aux = len(lrs), 1 if aux is None else len(aux)
    plan = build_plan(spec, power, lrs, aux, kind, effective_lr=effective_lr)
    n_b = batch_sizes.size
    best = np.full(n_b, np.inf)
    best_cfg = np.full(n_b, np.iinfo(np.int64).max, dtype=np.int64)
    all_b = np.arange(n_b)

    def cfg_index(i_lr, i_aux):
        return i_lr * n_aux + i_aux

    # level 0: coarse grid on a geometric t-grid; Det and Noise do not depend on B
    s_lr, s_aux = coarse
    i_lr0 = np.unique(np.r_[np.arange(s_lr // 2, n_lr, s_lr), n_lr - 1])
    i_aux0 = np.unique(np.r_[np.arange(0, n_aux, s_aux), n_aux - 1])
    cfg0 = cfg_index(i_lr0[:, None], i_aux0[None, :]).ravel()
    cfg0 = cfg0[plan.stable_cfg[cfg0]]
    if cfg0.size:
        t_grid = np.unique(np.ceil(2.0 ** (np.arange(0, 32 * per_octave + 1) / per_octave)))
        det, noise = plan.det_noise(cfg0, np.broadcast_to(t_grid, (cfg0.size, t_grid.size)))
        with np.errstate(divide="ignore", invalid="ignore"):
            b_needed = np.where(det < target, noise / (target - det), np.inf)  # (n_cfg0, n_t)
        reach = b_needed[None, :, :] <= batch_sizes[:, None, None]  # (n_B, n_cfg0, n_t)
        first = np.where(reach.any(axis=2), reach.argmax(axis=2), t_grid.size)  # (n_B, n_cfg0)
        k_best = first.min(axis=1)
        bi, ci = np.nonzero((first == k_best[:, None]) & (k_best[:, None] < t_grid.size))
        if bi.size:
            k = k_best[bi]
            lo = np.where(k > 0, t_grid[np.maximum(k - 1, 0)], 0.0)
            hits = _bisect(plan, cfg0[ci], batch_sizes[bi], lo, t_grid[k], target)
            _update(best, best_cfg, hits, cfg0[ci], bi)
        # level-1 centres: the best coarse lr of the ``n_centres`` best coarse aux columns, per batch size
        aux_of = cfg0 % n_aux
        centres = [[] for _ in range(n_b)]
        for b in range(n_b):
            col_best = {}
            for j in np.argsort(first[b], kind="stable"):
                if first[b, j] >= t_grid.size or len(col_best) >= n_centres:
                    break
                col_best.setdefault(int(aux_of[j]), int(cfg0[j]))
            centres[b] = list(col_best.values())
    else:
        centres = [[] for _ in range(n_b)]

    missing = all_b[~np.isfinite(best)]
    if missing.size and not exhaustive:  # no coarse hit (tiny target or narrow grid): whole grid for those
        every = np.arange(n_lr * n_aux)
        _improve(plan, np.tile(every, missing.size), np.repeat(missing, every.size), batch_sizes, best, best_cfg,
                 target)
    # two finer levels: around the level-1 centres (and the best point), then around the best point
    for level, (r_lr, r_aux, st_lr, st_aux) in enumerate(((s_lr, s_aux, 2, 1), (2, 1, 1, 1))):
        cc, bb = [], []
        for b in all_b[np.isfinite(best)]:
            pts = {int(best_cfg[b])} | (set(centres[b]) if level == 0 else set())
            for centre in pts:
                il, ia = divmod(centre, n_aux)
                nl = np.arange(max(il - r_lr, 0), min(il + r_lr, n_lr - 1) + 1, st_lr)
                na = np.arange(max(ia - r_aux, 0), min(ia + r_aux, n_aux - 1) + 1, st_aux)
                c = cfg_index(nl[:, None], na[None, :]).ravel()
                cc.append(c)
                bb.append(np.full(c.size, b))
        if cc:
            _improve(plan, np.concatenate(cc), np.concatenate(bb), batch_sizes, best, best_cfg, target)
    if exhaustive:
        _certify(plan, batch_sizes, best, best_cfg, target)

    found = np.isfinite(best)
    lr_index = np.where(found, best_cfg // n_aux, -1)
    aux_index = np.where(found & (aux is not None), best_cfg % n_aux, -1)
    return GridResult(best, lr_index, aux_index)
