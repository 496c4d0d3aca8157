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
momentum, or αh̃ > 1) can dip below the target early, and the search then reports one of its crossings, not
necessarily the first. The tests compare against a step-by-step scan. inf means never (unstable, or steady-state
risk above the target).

Only the lanes that can still be a batch size's minimum are bisected to the end (see :func:`_bisect`), and the
closed form is evaluated in place, chunk by chunk, with sin/cos only on complex-root bins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from lightning_sgd.nqm import _checks as check
from lightning_sgd.nqm.core import Spectrum, _check_spectrum, _direction_terms, _sum_constants, optimizer_coefficients

T_MAX = 2.0**40  # give up beyond this many steps


_FIELDS = ("kappa", "A", "AQ2", "C", "log_mod", "r1", "L", "x", "neg_inv_w", "psi", "cos_psi", "sin_psi",
           "inv_sin_psi")
_F = {f: i for i, f in enumerate(_FIELDS)}
# per-row flags of _Fields: which special cases of the closed form occur in some bin of the row
_CPLX, _X_NEG, _DOUBLE, _P_NEG, _MOMENTS = 1, 2, 4, 8, 16  # _MOMENTS: Q ≠ 0 or κ ≠ 0 somewhere (not plain SGD)
_WORK = 5  # scratch arrays of one chunk that _eval uses
_CHUNK = 65_536  # elements (lanes × t × bins) per evaluation: small enough for the scratch arrays to stay in cache


@dataclass
class _Fields:
    """Constants of the closed form for some configurations (rows); ``fields[rows]`` selects rows."""

    values: np.ndarray  # (n_fields, n, k), field-major: one field of many rows is one contiguous block
    cplx: np.ndarray  # (n, k) bool: complex roots
    x_neg: np.ndarray  # (n, k) bool: real roots of opposite signs (x = r2/r1 < 0)
    double: np.ndarray  # (n, k) bool: a double real root (w = 0)
    p_neg: np.ndarray  # (n, k) bool: P < 0
    noise_inf: np.ndarray  # (n,) Noise(∞) at B = 1
    flags: np.ndarray  # (n,) int: bits _CPLX, _X_NEG, _DOUBLE, _P_NEG, _MOMENTS
    stable: np.ndarray  # (n,) bool: every bin stable

    def __getitem__(self, rows: np.ndarray | slice) -> _Fields:
        if isinstance(rows, np.ndarray):
            if rows.dtype == bool:
                if rows.all():
                    return self
                rows = np.flatnonzero(rows)
            elif rows.size == self.flags.size and np.array_equal(rows, np.arange(rows.size)):
                return self
            values = np.take(self.values, rows, axis=1)  # (faster than fancy indexing on the middle axis)
        else:
            values = self.values[:, rows]
        return _Fields(values, self.cplx[rows], self.x_neg[rows], self.double[rows], self.p_neg[rows],
                       self.noise_inf[rows], self.flags[rows], self.stable[rows])


class _Plan:
    """Per (configuration, bin) constants of the closed form, so that evaluating at t costs two exps per bin.

    Only the steady-state risk and stability are computed for the whole grid; the constants of the closed form
    are computed for the configurations a call asks for (the search touches a small part of the grid).
    """

    def __init__(self, coeffs: Callable[[np.ndarray], tuple[np.ndarray, ...]], n_cfg: int, init: ArrayLike,
                 weight: np.ndarray, *, eager: bool = False) -> None:
        # coeffs(rows) -> (P, Q, kappa, noise_unit), each (len(rows), k); init, weight: (k,)
        self.coeffs = coeffs
        self.wdet = weight * init  # (k,)
        self.weight = weight
        self.table = None
        if eager:  # every configuration will be evaluated: its constants once, now
            self.table = self.fields(np.arange(n_cfg))
            self.stable_cfg = self.table.stable
            self.noise_inf = np.where(self.table.stable, self.table.noise_inf, np.inf)
            return
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

    def fields(self, rows: np.ndarray) -> _Fields:
        """Constants of the closed form for the configurations ``rows``."""
        if self.table is not None:
            return self.table[rows]
        P, Q, kappa, noise_unit = self.coeffs(rows)
        values = np.empty((len(_FIELDS),) + Q.shape)
        v = dict(zip(_FIELDS, values))  # each (n, k)
        s_inf, p_inf, stable = _sum_constants(P, Q)
        s_inf = np.where(stable, s_inf, 0.0)
        p_inf = np.where(stable, p_inf, 0.0)
        wnoise = np.where(stable, self.weight * noise_unit, 0.0)  # ½ h n ν² at B = 1
        Pa = np.abs(P)
        disc = Pa * Pa - 4.0 * Q
        real = disc >= 0
        cplx = ~real
        with np.errstate(divide="ignore", invalid="ignore"):
            sq = np.sqrt(np.maximum(disc, 0.0))
            r1 = np.maximum(0.5 * (Pa + sq), 1e-300)  # dominant real root of x² − |P|x + Q
            w = np.minimum(sq / r1, 2.0)  # 1 − r2/r1
            x = np.subtract(1.0, w, out=v["x"])
            # log|x|, accurately near x = 1 (critical damping) through log1p(−w); −inf at x = 0
            np.log(np.abs(x), out=v["L"])
            np.log1p(-w, out=v["L"], where=x > 0.5)
            rho = np.sqrt(np.maximum(Q, 1e-300))
            two_rho = 2.0 * rho
            v["sin_psi"].fill(1.0)  # (1 for real roots, unused)
            np.divide(np.sqrt(np.maximum(-disc, 0.0)), two_rho, out=v["sin_psi"], where=cplx)
            v["cos_psi"].fill(1.0)
            np.divide(Pa, two_rho, out=v["cos_psi"], where=cplx)
            np.arctan2(v["sin_psi"], v["cos_psi"], out=v["psi"])
            np.divide(1.0, v["sin_psi"], out=v["inv_sin_psi"])
            np.log(r1, out=v["log_mod"])  # log r1, or log ρ for complex roots
            np.log(rho, out=v["log_mod"], where=cplx)
            np.copyto(v["r1"], r1)  # r1, or ρ for complex roots
            np.copyto(v["r1"], rho, where=cplx)
            v["neg_inv_w"].fill(-0.0)  # −1/w, 0 at w = 0
            np.divide(-1.0, w, out=v["neg_inv_w"], where=w > 0)
        np.copyto(v["kappa"], kappa)
        A = np.multiply(wnoise, s_inf, out=v["A"])
        np.multiply(A, Q, out=v["AQ2"])
        v["AQ2"] *= Q
        np.multiply(2.0, wnoise, out=v["C"])
        v["C"] *= Q
        v["C"] *= p_inf
        x_neg, double, p_neg = x < 0, real & (w <= 0), P < 0
        moments = (x != 0) | (kappa != 0) | (v["AQ2"] != 0) | (v["C"] != 0)
        flags = sum(bit * m.any(axis=1) for bit, m in ((_CPLX, cplx), (_X_NEG, x_neg), (_DOUBLE, double),
                                                        (_P_NEG, p_neg), (_MOMENTS, moments)))
        return _Fields(values, cplx, x_neg, double, p_neg, A.sum(axis=1), np.asarray(flags, dtype=np.int64),
                       stable.all(axis=1))

    def det_noise(self, cfg: np.ndarray, t: np.ndarray, data: _Fields | None = None,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Det(t), Noise(t) at B = 1) for lanes (cfg[i], t[i, j]); cfg (n,), t (n, m) of integers ≥ 1.

        ``data`` = ``self.fields(cfg)`` when the caller already has it (bisection reuses it every round), or a
        table of constants with ``rows`` the row of each lane in it (gathered chunk by chunk).
        """
        t = np.asarray(t, float)
        squeeze = t.ndim == 1
        t2 = t[:, None] if squeeze else t
        det = np.empty(t2.shape)
        noise = np.empty(t2.shape)
        if data is None and self.table is not None:  # all constants at hand: gather per chunk
            data, rows = self.table, cfg
        elif data is None:
            uniq, rows = np.unique(cfg, return_inverse=True)
            data = self.fields(uniq)
        m, k = t2.shape[1], data.values.shape[2]
        chunk = max(1, _CHUNK // (m * k))
        work = np.empty((_WORK, min(chunk, cfg.size) * m * k))
        for s in range(0, cfg.size, chunk):
            part = data[slice(s, s + chunk) if rows is None else rows[s:s + chunk]]
            det[s:s + chunk], noise[s:s + chunk] = self._eval(part, t2[s:s + chunk], work)
        return (det[:, 0], noise[:, 0]) if squeeze else (det, noise)

    def _eval(self, data: _Fields, t: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Det, Noise) of the rows of ``data`` at t (n, m): F_t and F_{t+1} of every bin, then the sums over bins.

        Real roots: F_t = sgn^{t−1} r1^{t−1} (1 − x^t)/w, F_{t+1} = sgn^t r1^t (1 + x (1 − x^t)/w); complex roots:
        F_t = ρ^{t−1} sin(tψ)/sin ψ, F_{t+1} = ρ^t sin((t+1)ψ)/sin ψ. Written into ``work`` (≥ 5 × n·m·k)."""
        n, m = t.shape
        k = data.values.shape[2]
        mod, gt, gt1, w1, w2 = (work[i, :n * m * k].reshape(n, m, k) for i in range(_WORK))
        flags = np.bitwise_or.reduce(data.flags)
        v = data.values

        def g(f: str) -> np.ndarray:
            return v[_F[f], :, None, :]  # (n, 1, k)

        tt = t[:, :, None]  # (n, m, 1)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            odd = np.mod(tt, 2.0) == 1.0  # (n, m, 1)
            np.multiply(tt - 1.0, g("log_mod"), out=mod)
            np.exp(mod, out=mod)  # r1^{t−1} or ρ^{t−1}
            if not flags & _MOMENTS:  # plain SGD (Q = 0): x = r2/r1 = 0, so (1 − x^t)/w = 1, F_t = sgn^{t−1} r1^{t−1}
                np.copyto(gt, mod)
                np.multiply(mod, g("r1"), out=gt1)
            else:
                # real roots: g_t = (1 − x^t)/w, g_{t+1} = 1 + x g_t ; x^t = sign^t · |x|^t
                np.multiply(tt, g("L"), out=gt)
                np.expm1(gt, out=gt)  # x^t − 1 for x ≥ 0
                if flags & _X_NEG:
                    np.subtract(-2.0, gt, out=gt, where=data.x_neg[:, None, :] & odd)
                np.multiply(gt, g("neg_inv_w"), out=gt)
                if flags & _DOUBLE:  # w = 0: g_t = t
                    np.copyto(gt, tt, where=data.double[:, None, :])
                np.multiply(g("x"), gt, out=gt1)
                gt1 += 1.0
                if flags & _CPLX:  # sin and cos only where they count: elsewhere ρ^{t−1} = 0, so F_t = F_{t+1} = 0
                    on = mod > 0.0
                    on &= data.cplx[:, None, :]
                    np.multiply(tt, g("psi"), out=w2, where=on)
                    np.sin(w2, out=w1, where=on)  # sin(tψ) ...
                    np.cos(w2, out=w2, where=on)  # ... cos(tψ)
                    np.multiply(w1, g("inv_sin_psi"), out=gt, where=on)
                    np.multiply(w1, g("cos_psi"), out=w1, where=on)
                    np.multiply(w2, g("sin_psi"), out=w2, where=on)
                    np.add(w1, w2, out=w1, where=on)  # sin((t+1)ψ)
                    np.multiply(w1, g("inv_sin_psi"), out=gt1, where=on)
                np.multiply(mod, gt, out=gt)  # F_t
                np.multiply(mod, g("r1"), out=mod)
                np.multiply(mod, gt1, out=gt1)  # F_{t+1}
            f_t, f_t1 = gt, gt1
            if flags & _P_NEG:  # sgn^{t−1} on F_t and sgn^t on F_{t+1} when P < 0
                neg = data.p_neg[:, None, :]
                np.negative(f_t, out=f_t, where=neg & ~odd)
                np.negative(f_t1, out=f_t1, where=neg & odd)
            d = np.multiply(g("kappa"), f_t, out=w1)
            np.subtract(f_t1, d, out=d)
            d *= d
            det = np.einsum("nmk,k->nm", d, self.wdet)  # (not d @ wdet: BLAS may sum a row differently by position)
            # Σ wnoise (s∞ − tail) = noise∞ − Σ A F_{t+1}² − Σ A Q² F_t² + Σ C F_{t+1} F_t
            noise = data.noise_inf[:, None] - np.einsum("nmk,nk->nm", np.multiply(f_t1, f_t1, out=w1), v[_F["A"]])
            if flags & _MOMENTS:  # (zero terms otherwise)
                noise -= np.einsum("nmk,nk->nm", np.multiply(f_t, f_t, out=w1), v[_F["AQ2"]])
                noise += np.einsum("nmk,nk->nm", np.multiply(f_t1, f_t, out=w1), v[_F["C"]])
        return det, noise


def check_target(spec: Spectrum, target: float) -> float:
    """The target risk: finite, > 0 and below the initial risk (which is reached at step 0, before any search)."""
    target = check.real("target", target, check.POSITIVE)
    if target >= spec.initial_risk:
        raise ValueError(f"target {target:g} is not below the model's initial risk {spec.initial_risk:.6g}: it is "
                         f"met before the first step. Lower the target (the paper uses 0.01).")
    return target


def build_plan(spec: Spectrum, power: float, lrs: ArrayLike, aux: ArrayLike, kind: str, *, effective_lr: bool = False,
               pairs: bool = False) -> _Plan:
    """Plan for the (lr × aux) grid (row index = i_lr * n_aux + i_aux); with ``pairs=True`` for the configurations
    (lrs[i], aux[i]) instead (row index = i), all of which are then prepared at once."""
    h_tilde, sigma2, weight = _direction_terms(spec, power)
    lrs = np.asarray(lrs, float)
    aux_arr = None if aux is None else np.asarray(aux, float)
    n_aux = 1 if aux is None else len(aux_arr)

    def coeffs(rows: np.ndarray) -> tuple[np.ndarray, ...]:
        if pairs:
            i_lr, i_aux = rows, (rows if aux_arr is not None else np.zeros_like(rows))
        else:
            i_lr, i_aux = np.divmod(rows, n_aux)
        lr = lrs[i_lr][:, None]
        a = None if aux_arr is None else aux_arr[i_aux][:, None]
        if effective_lr and kind == "momentum":
            lr = lr * (1.0 - a)
        kw = {"momentum": a} if kind == "momentum" else {"ema": a} if kind == "ema" else {}
        P, Q, kappa, nu = optimizer_coefficients(lr, h_tilde[None, :], **kw)
        shape = (rows.size, h_tilde.size)
        return tuple(np.broadcast_to(v, shape) for v in (P, Q, kappa, nu * lr * lr * sigma2[None, :]))

    return _Plan(coeffs, len(lrs) if pairs else len(lrs) * n_aux, spec.init, weight, eager=pairs)


def _reached(plan: _Plan, cfg: np.ndarray, t: np.ndarray, bs: np.ndarray, target: float,
             data: _Fields | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    det, noise = plan.det_noise(cfg, t, data, rows)
    return det + noise / bs <= target


class _Shrinking:
    """The fields of the lanes still active in a loop whose active set only shrinks: re-gathered only when it
    shrinks, from the previous (smaller) gather, instead of every round."""

    def __init__(self, data: _Fields) -> None:
        self.lanes, self.data = np.arange(data.flags.size), data

    def __call__(self, idx: np.ndarray) -> _Fields:  # idx: sorted subset of the previous call's idx
        if idx.size < self.lanes.size:
            self.data = self.data[np.searchsorted(self.lanes, idx)]
            self.lanes = idx
        return self.data


def _lane_fields(plan: _Plan, cfg: np.ndarray) -> _Fields:
    """``plan.fields(cfg)``, computed once per distinct configuration (lanes often share one)."""
    uniq, inv = np.unique(cfg, return_inverse=True)
    return plan.fields(uniq)[inv]


def _bisect(plan: _Plan, cfg: np.ndarray, bs: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: float,
            data: _Fields | None = None, group: np.ndarray | None = None) -> np.ndarray:
    """Smallest integer t in (lo, hi] with risk ≤ target, given it holds at hi and not at lo (lo ≥ 0).
    ``data``: the lanes' ``plan.fields(cfg)`` when the caller has them.

    ``group`` (ints, one per lane): only each group's smallest t is wanted. A lane stops as soon as its lo is at
    or above the smallest hi in its group (its t > lo cannot beat that lane's), and then returns lo + 1: more than
    its group's minimum, so the minimum and the lanes attaining it are exactly those of the full bisection."""
    lo, hi = np.asarray(lo, float).copy(), np.asarray(hi, float).copy()
    if data is None:
        data = _lane_fields(plan, cfg)  # computed once, reused by every round
    # t = 1 might already do when lo = 0 (t = 0 is the initial risk, above the target by assumption)
    zero = (lo < 1) & (hi > 1)
    if zero.any():
        at1 = _reached(plan, cfg[zero], np.ones(zero.sum()), bs[zero], target, data[zero])
        hi[np.flatnonzero(zero)[at1]] = 1.0
        lo[zero] = np.maximum(lo[zero], 1.0)
    if group is not None:
        group = np.unique(group, return_inverse=True)[1]
    active = _Shrinking(data)
    while True:
        if group is not None:  # lanes that cannot reach their group's minimum are done
            g_min = np.full(group.max() + 1, np.inf)
            np.minimum.at(g_min, group, hi)
            out = (lo >= g_min[group]) & (hi - lo > 1)
            hi[out] = lo[out] + 1.0
        idx = np.flatnonzero(hi - lo > 1)
        if idx.size == 0:
            return hi
        mid = np.floor((lo[idx] + hi[idx]) / 2)
        ok = _reached(plan, cfg[idx], mid, bs[idx], target, active(idx))
        hi[idx[ok]] = mid[ok]
        lo[idx[~ok]] = mid[~ok]


@dataclass
class GridResult:
    steps: np.ndarray  # (n_B,) minimal steps (inf if the target is never reached on the grid)
    lr_index: np.ndarray  # (n_B,) argmin index into the lr grid (−1 if none)
    aux_index: np.ndarray  # (n_B,) argmin index into the aux grid (−1 if none / no aux)


def _update(best: np.ndarray, best_cfg: np.ndarray, hits: np.ndarray, cfg: np.ndarray, b: np.ndarray) -> None:
    order = np.lexsort((cfg, hits))  # ties: smallest config index (smallest lr, then smallest aux)
    for h, c, i in zip(hits[order], cfg[order], b[order]):
        if h < best[i] or (h == best[i] and c < best_cfg[i]):
            best[i], best_cfg[i] = h, c


def _improve(plan: _Plan, cand_cfg: np.ndarray, cand_b: np.ndarray, batch_sizes: ArrayLike, best: np.ndarray,
             best_cfg: np.ndarray, target: float) -> None:
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
    uniq, inv = np.unique(cand_cfg, return_inverse=True)
    table = plan.fields(uniq)  # once per configuration, for the test and the bisection
    ok = _reached(plan, cand_cfg, t_test, bs, target, table, inv)
    cand_cfg, cand_b, bs, t_test = cand_cfg[ok], cand_b[ok], bs[ok], t_test[ok]
    if cand_cfg.size:
        hits = _bisect(plan, cand_cfg, bs, np.zeros(cand_cfg.size), t_test, target, table[inv[ok]], group=cand_b)
        _update(best, best_cfg, hits, cand_cfg, cand_b)


def _certify(plan: _Plan, batch_sizes: ArrayLike, best: np.ndarray, best_cfg: np.ndarray, target: float) -> None:
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
        hits = _bisect(plan, c, batch_sizes[bi], np.zeros(ci.size), t_test[rows][ci, bi], target, group=bi)
        _update(best, best_cfg, hits, c, bi)


def _check_grid_args(spec: Spectrum, batch_sizes: ArrayLike, lrs: ArrayLike, aux: ArrayLike, kind: str,
                     power: float, target: float, exhaustive: bool, coarse: tuple[int, int], per_octave: int,
                     effective_lr: bool, n_centres: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                  tuple[int, int]]:
    """:func:`grid_steps`' arguments checked (each error names its argument); the arrays as 1-d arrays."""
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
    return batch_sizes, lrs, aux, coarse


def grid_steps(
    spec: Spectrum,
    batch_sizes: ArrayLike,
    lrs: ArrayLike,
    aux: ArrayLike = None,
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
    batch_sizes, lrs, aux, coarse = _check_grid_args(spec, batch_sizes, lrs, aux, kind, power, target, exhaustive,
                                                     coarse, per_octave, effective_lr, n_centres)
    n_lr, n_aux = len(lrs), 1 if aux is None else len(aux)
    plan = build_plan(spec, power, lrs, aux, kind, effective_lr=effective_lr)
    n_b = batch_sizes.size
    best = np.full(n_b, np.inf)
    best_cfg = np.full(n_b, np.iinfo(np.int64).max, dtype=np.int64)
    all_b = np.arange(n_b)

    def cfg_index(i_lr: np.ndarray, i_aux: np.ndarray) -> np.ndarray:
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
            hits = _bisect(plan, cfg0[ci], batch_sizes[bi], lo, t_grid[k], target, group=bi)
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


# ------------------------------------------------------------------------------------------------ refinement
#: Golden-section iterations per coordinate: the bracket (one grid step either side) shrinks by 0.618^n.
REFINE_ITERATIONS = 6
#: Coordinate rounds (lr, then β/γ, then lr again, ...) when a second parameter is tuned.
REFINE_ROUNDS = 2
#: The bracket reaches this many grid steps either side of the current point.
REFINE_BRACKET = 2.0
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def _golden_section(at: Callable[..., list[tuple[np.ndarray, np.ndarray]]], centre: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Golden-section search of each lane's continuous crossing time over [lo, hi] (``REFINE_ITERATIONS`` steps);
    ``at(x1, x2, ...)`` returns (steps, crossing time) at each of the points in one call. Returns the best point
    found, or ``centre`` where that is not strictly better, and the integer steps there."""
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    (sc, fc), (sd, fd), (s0, f0) = at(c, d, centre)  # the centre now too: one call instead of three
    for _ in range(REFINE_ITERATIONS):
        left = fc <= fd  # minimum in [lo, d]
        hi = np.where(left, d, hi)
        lo = np.where(left, lo, c)
        new = np.where(left, hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo))
        ((snew, fnew),) = at(new)
        c, d, fc, fd, sc, sd = (np.where(left, new, d), np.where(left, c, new), np.where(left, fnew, fd),
                                np.where(left, fc, fnew), np.where(left, snew, sd), np.where(left, sc, snew))
    left = fc <= fd
    better = np.minimum(fc, fd) < f0
    return np.where(better, np.where(left, c, d), centre), np.where(better, np.where(left, sc, sd), s0)


def _risk(plan: _Plan, cfg: np.ndarray, t: np.ndarray, bs: np.ndarray, data: _Fields) -> np.ndarray:
    """Risk of lanes ``cfg`` at the integer steps ``t`` (n, m), batch sizes ``bs`` (n,)."""
    det, noise = plan.det_noise(cfg, t, data)
    return det + noise / bs[:, None]


def _secant_crossing(plan: _Plan, cfg: np.ndarray, bs: np.ndarray, target: float, data: _Fields,
                     lo: np.ndarray, r_lo: np.ndarray, hi: np.ndarray, r_hi: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Narrow integer brackets (lo: risk above target, hi: at or below) to hi = lo + 1.

    Works on f(t) = log(risk − floor) − log(target − floor), floor = Noise(∞)/B the steady-state risk, which is
    close to linear in t once the slowest directions dominate. Each round evaluates, per lane, two neighbouring
    integers t, t + 1 around an estimate of the crossing f = 0: first the secant of the bracket's ends, then a
    Newton step from the last pair (its difference is the slope, and it sits next to the crossing), so a lane
    usually closes in two or three rounds. A lane whose bracket did not halve twice in a row takes the bisection
    midpoint next, so no lane does worse than about three times bisection."""
    lo, hi, r_lo, r_hi = lo.copy(), hi.copy(), r_lo.copy(), r_hi.copy()
    floor = plan.noise_inf[cfg] / bs
    log_gap = np.log(target - floor)

    def gap(r: np.ndarray, i: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(np.maximum(r - floor[i, None], 1e-300)) - log_gap[i, None]

    newton = np.full(lo.size, np.nan)  # Newton estimate from the pair nearest the crossing so far (nan: none)
    best = np.full(lo.size, np.inf)  # |f| at that pair
    slow = np.zeros(lo.size, dtype=np.int8)  # rounds in a row whose bracket did not halve
    active = _Shrinking(data)
    while True:
        idx = np.flatnonzero(hi - lo > 1)
        if idx.size == 0:
            return lo, r_lo, hi, r_hi
        a, b = lo[idx], hi[idx]
        f = gap(np.stack([r_lo[idx], r_hi[idx]], axis=1), idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            secant = a + (b - a) * f[:, 0] / (f[:, 0] - f[:, 1])
        est = np.where((newton[idx] > a) & (newton[idx] < b), newton[idx], secant)
        est = np.where(np.isfinite(est) & (slow[idx] < 3), est, (a + b) / 2)
        t1 = np.clip(np.floor(est), a + 1, b - 1)
        t = np.stack([t1, np.minimum(t1 + 1, b - 1)], axis=1)  # (n, 2)
        r = _risk(plan, cfg[idx], t, bs[idx], active(idx))
        reached = r <= target
        rows = np.arange(idx.size)
        t_hi = np.where(reached, t, np.inf)
        j_hi = t_hi.argmin(axis=1)
        new_hi = t_hi[rows, j_hi]
        take = new_hi < b
        hi[idx[take]] = new_hi[take]
        r_hi[idx[take]] = r[take, j_hi[take]]
        t_lo = np.where(~reached & (t < hi[idx, None]), t, -np.inf)
        j_lo = t_lo.argmax(axis=1)
        new_lo = t_lo[rows, j_lo]
        take = new_lo > a
        lo[idx[take]] = new_lo[take]
        r_lo[idx[take]] = r[take, j_lo[take]]
        ft = gap(r, idx)
        slope = ft[:, 1] - ft[:, 0]
        nearer = (t[:, 1] > t[:, 0]) & (slope < 0) & (np.abs(ft[:, 0]) < best[idx])
        with np.errstate(divide="ignore", invalid="ignore"):
            newton[idx[nearer]] = (t[:, 0] - ft[:, 0] / slope)[nearer]
        best[idx[nearer]] = np.abs(ft[nearer, 0])
        halved = (hi[idx] - lo[idx]) <= 0.5 * (b - a)
        slow[idx] = np.where(halved | (slow[idx] >= 3), 0, slow[idx] + 1)


def crossing_steps(spec: Spectrum, power: float, kind: str, lrs: np.ndarray, aux: np.ndarray | None,
                   batch_sizes: np.ndarray, target: float, guess: np.ndarray, *, effective_lr: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Steps to ``target`` of the configurations (lrs[i], aux[i]) at batch_sizes[i]: the integer steps (inf when not
    reached within 16× ``guess``) and a continuous version, the crossing time interpolated linearly in the risk
    between step S − 1 and S (in (S − 1, S]), which a one-dimensional minimiser can follow between integers.

    ``guess`` (the steps of a nearby configuration) sets the first bracket, [guess/1.03, guess·1.03]; lanes outside
    it get [0, guess/1.03] or are tried at 1.3×, 4× and 16× the guess."""
    n = batch_sizes.size
    plan = build_plan(spec, power, lrs, aux, kind, effective_lr=effective_lr, pairs=True)
    cfg = np.arange(n)
    steps = np.full(n, np.inf)
    frac = np.full(n, np.inf)
    live = np.flatnonzero(plan.stable_cfg & (plan.noise_inf / batch_sizes < target))
    if live.size == 0:
        return steps, frac
    cl, bl = cfg[live], batch_sizes[live]
    data = plan.fields(cl)
    g = np.maximum(np.where(np.isfinite(guess[live]), guess[live], 1.0), 1.0)
    t = np.stack([np.maximum(np.floor(g / 1.03), 1.0), np.ceil(g * 1.03) + 1.0], axis=1)
    r = _risk(plan, cl, t, bl, data)
    lo, r_lo = np.zeros(live.size), np.full(live.size, spec.initial_risk)
    hi, r_hi = np.full(live.size, np.inf), np.full(live.size, np.inf)
    at_lo = r[:, 0] <= target  # crosses before the bracket: [0, lo]
    hi[at_lo], r_hi[at_lo] = t[at_lo, 0], r[at_lo, 0]
    mid = ~at_lo & (r[:, 1] <= target)
    lo[mid], r_lo[mid], hi[mid], r_hi[mid] = t[mid, 0], r[mid, 0], t[mid, 1], r[mid, 1]
    late = np.flatnonzero(~at_lo & ~mid)
    if late.size:  # crosses after the bracket (or never): try further out
        tl = np.stack([np.ceil(g[late] * f) for f in (1.3, 4.0, 16.0)], axis=1)
        rl = _risk(plan, cl[late], tl, bl[late], data[late])
        ok = rl <= target
        j = ok.argmax(axis=1)
        has = ok.any(axis=1)
        rows = np.arange(late.size)
        prev_t = np.where(j > 0, tl[rows, np.maximum(j - 1, 0)], t[late, 1])
        prev_r = np.where(j > 0, rl[rows, np.maximum(j - 1, 0)], r[late, 1])
        sel = late[has]
        lo[sel], r_lo[sel] = prev_t[has], prev_r[has]
        hi[sel], r_hi[sel] = tl[rows[has], j[has]], rl[rows[has], j[has]]
    found = np.flatnonzero(np.isfinite(hi))
    lo_s, r_lo_s, hi_s, r_hi_s = _secant_crossing(plan, cl[found], bl[found], target, data[found], lo[found],
                                                  r_lo[found], hi[found], r_hi[found])
    out = live[found]
    steps[out] = hi_s
    with np.errstate(divide="ignore", invalid="ignore"):
        part = np.clip((r_lo_s - target) / (r_lo_s - r_hi_s), 0.0, 1.0)
    frac[out] = hi_s - 1.0 + np.where(np.isfinite(part), part, 1.0)
    return steps, frac


#: Lanes with at most this many steps get the joint polish: their integer steps have wide plateaus and the optimum
#: lies on a narrow ridge of (α, β), where a search one coordinate at a time stalls.
POLISH_MAX_STEPS = 400
POLISH_POINTS = 5  # per coordinate and zoom level of the joint search
POLISH_LEVELS = 6  # zoom levels: the box halves each level
POLISH_ROUNDS = 8  # at most this many one-step improvements per lane


def _min_risk(spec: Spectrum, power: float, kind: str, bs: np.ndarray, t: np.ndarray, x_lr: np.ndarray,
              x_aux: np.ndarray, w_lr: float, w_aux: float, box: tuple[float, float, float, float],
              effective_lr: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per lane, the smallest risk at step t[i] over (log α, log(1 − β)) near (x_lr[i], x_aux[i]): a K × K grid
    over a box of half-widths (w_lr, w_aux), re-centred on its best point and halved ``POLISH_LEVELS`` times."""
    offsets = np.linspace(-1.0, 1.0, POLISH_POINTS)
    u, v = (g.ravel() for g in np.meshgrid(offsets, offsets, indexing="ij"))
    n, m = x_lr.size, u.size
    x_lr, x_aux = x_lr.copy(), x_aux.copy()
    best = np.full(n, np.inf)
    for level in range(POLISH_LEVELS):
        scale = 0.5**level
        cand_lr = np.clip(x_lr[:, None] + u[None, :] * w_lr * scale, box[0], box[1])  # (n, m)
        cand_aux = np.clip(x_aux[:, None] + v[None, :] * w_aux * scale, box[2], box[3])
        plan = build_plan(spec, power, np.exp(cand_lr.ravel()), -np.expm1(cand_aux.ravel()), kind,
                          effective_lr=effective_lr, pairs=True)
        risk = np.full(n * m, np.inf)
        ok = np.flatnonzero(plan.stable_cfg)
        if ok.size:
            det, noise = plan.det_noise(ok, np.repeat(t, m)[ok])
            risk[ok] = det + noise / np.repeat(bs, m)[ok]
        risk = np.where(np.isfinite(risk), risk, np.inf).reshape(n, m)
        j = risk.argmin(axis=1)
        rows = np.arange(n)
        better = risk[rows, j] < best
        best = np.where(better, risk[rows, j], best)
        x_lr = np.where(better, cand_lr[rows, j], x_lr)
        x_aux = np.where(better, cand_aux[rows, j], x_aux)
    return best, x_lr, x_aux


def _polish(spec: Spectrum, power: float, kind: str, bs: np.ndarray, target: float, steps: np.ndarray,
            x_lr: np.ndarray, x_aux: np.ndarray, w_lr: float, w_aux: float, lr_bounds: tuple[float, float],
            aux_bounds: tuple[float, float], effective_lr: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two tuned parameters, few steps: can some (α, β) near the current one reach the target one step earlier?
    Minimise the risk at step S − 1 jointly over both (:func:`_min_risk`, a smooth function, unlike the integer
    steps); where the minimum is at or below the target, move there and take its exact steps; repeat."""
    steps, x_lr, x_aux = steps.copy(), x_lr.copy(), x_aux.copy()
    box = (np.log(lr_bounds[0]), np.log(lr_bounds[1]), np.log1p(-min(aux_bounds[1], 1 - 1e-12)),
           np.log1p(-aux_bounds[0]) if aux_bounds[0] < 1 else 0.0)
    active = np.isfinite(steps) & (steps <= POLISH_MAX_STEPS) & (steps > 1)
    for _ in range(POLISH_ROUNDS):
        lanes = np.flatnonzero(active)
        if lanes.size == 0:
            break
        risk, new_lr, new_aux = _min_risk(spec, power, kind, bs[lanes], steps[lanes] - 1.0, x_lr[lanes],
                                          x_aux[lanes], 1.5 * w_lr, 1.5 * w_aux, box, effective_lr)
        ok = risk <= target
        active[lanes[~ok]] = False
        if not ok.any():
            break
        sel = lanes[ok]
        exact, _ = crossing_steps(spec, power, kind, np.exp(new_lr[ok]), -np.expm1(new_aux[ok]), bs[sel], target,
                                  steps[sel] - 1.0, effective_lr=effective_lr)
        better = exact < steps[sel]
        upd = sel[better]
        steps[upd], x_lr[upd], x_aux[upd] = exact[better], new_lr[ok][better], new_aux[ok][better]
        active[sel[~better]] = False
        active &= steps > 1
    return steps, x_lr, x_aux


def refine(spec: Spectrum, batch_sizes: ArrayLike, lr: ArrayLike, aux: ArrayLike, steps: ArrayLike, *,
           kind: str = "sgd", power: float = 0.0,
           target: float = 0.01, lr_bounds: tuple[float, float] | None = None,
           aux_bounds: tuple[float, float] | None = None, lr_step: float = 1.1, aux_step: float = 1.5,
           effective_lr: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Refine a grid optimum to the continuous one: golden-section search on log α when ``lr_bounds`` is given (the
    lr is tuned; within ``lr_step``, the grid's spacing ratio, of the grid point, clipped to the bounds), then on
    log(1 − β) / log(1 − γ) when ``aux_bounds`` is given (bounds on β/γ), alternating for ``REFINE_ROUNDS`` rounds;
    all batch sizes in lockstep.

    The minimised quantity is the continuous crossing time of :func:`crossing_steps`; the result is never worse
    than the grid point (a lane keeps its grid point unless the refined point needs fewer integer steps, or as
    many). Returns (steps, lr, aux) with lr the effective rate α/(1 − β) when ``effective_lr``.
    """
    bs = np.asarray(batch_sizes, float)
    best_steps = np.asarray(steps, float).copy()
    lr = np.asarray(lr, float).copy()
    aux = None if aux is None else np.asarray(aux, float).copy()
    lanes = np.flatnonzero(np.isfinite(best_steps) & np.isfinite(lr))
    if lanes.size == 0:
        return best_steps, lr, aux
    x_lr = np.log(lr[lanes])
    x_aux = None if aux is None else np.log1p(-aux[lanes])  # log(1 − β)
    guess = best_steps[lanes]

    n = lanes.size
    new_steps = None  # integer steps at (x_lr, x_aux), once a golden-section search has evaluated them

    def evaluate(log_lr: np.ndarray, log_one_minus: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, continuous crossing time) at (log α, log(1 − β)) per lane; several points per lane may be
        stacked (arrays of a multiple of n lanes): they are one call, and each lane's answer does not depend on the
        others."""
        a = None if log_one_minus is None else -np.expm1(log_one_minus)
        reps = log_lr.size // n
        return crossing_steps(spec, power, kind, np.exp(log_lr), a, np.tile(bs[lanes], reps), target,
                              np.tile(guess, reps), effective_lr=effective_lr)

    def golden(which: str) -> None:
        nonlocal x_lr, x_aux, new_steps
        centre = x_lr if which == "lr" else x_aux
        width = REFINE_BRACKET * np.log(lr_step if which == "lr" else aux_step)
        bounds = lr_bounds if which == "lr" else aux_bounds
        lo, hi = centre - width, centre + width
        if bounds is not None:  # always given for a tuned parameter
            if which == "lr":
                lo, hi = np.maximum(lo, np.log(bounds[0])), np.minimum(hi, np.log(bounds[1]))
            else:  # bounds on β: log(1 − β) decreases with β
                lo = np.maximum(lo, np.log1p(-min(bounds[1], 1 - 1e-12)))
                hi = np.minimum(hi, np.log1p(-bounds[0]) if bounds[0] < 1 else hi)

        def at(*xs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
            x = np.concatenate(xs)
            if which == "lr":
                steps_, frac = evaluate(x, None if x_aux is None else np.tile(x_aux, len(xs)))
            else:
                steps_, frac = evaluate(np.tile(x_lr, len(xs)), x)
            return [(steps_[i * n:(i + 1) * n], frac[i * n:(i + 1) * n]) for i in range(len(xs))]

        x, new_steps = _golden_section(at, centre, lo, hi)
        if which == "lr":
            x_lr = x
        else:
            x_aux = x

    for _ in range(REFINE_ROUNDS if (aux_bounds is not None and lr_bounds is not None) else 1):
        if lr_bounds is not None:
            golden("lr")
        if aux_bounds is not None and x_aux is not None:
            golden("aux")
    if new_steps is None:
        new_steps, _ = evaluate(x_lr, x_aux)
    if x_aux is not None and aux_bounds is not None and lr_bounds is not None:
        new_steps, x_lr, x_aux = _polish(spec, power, kind, bs[lanes], target, new_steps, x_lr, x_aux,
                                         np.log(lr_step), np.log(aux_step), lr_bounds, aux_bounds, effective_lr)
    keep = new_steps <= best_steps[lanes]
    sel = lanes[keep]
    best_steps[sel] = new_steps[keep]
    lr[sel] = np.exp(x_lr[keep])
    if aux is not None and x_aux is not None:
        aux[sel] = -np.expm1(x_aux[keep])
    return best_steps, lr, aux
