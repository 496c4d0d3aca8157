"""``lightning-sgd nqm``: the paper's NQM figures, steps-to-target tables, and fits to a measured sweep.

    lightning-sgd nqm figures --out docs/img [--only 3a 4] [--quick]
    lightning-sgd nqm steps --batch-sizes 1 16 256 4096 --momentum tune --power 0.5
    lightning-sgd nqm fit runs/sweep/results.csv --out runs/nqm_fit
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

__all__ = ["main"]


def _tunable(text: str | None):
    if text is None or text == "tune":
        return text
    return float(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-sgd nqm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("figures", help="write Figures 3a, 3b(+3c), 4, 13, 14 of Zhang et al. 2019 (PNG + CSV)")
    f.add_argument("--out", default="runs/nqm", help="output folder (default: runs/nqm)")
    f.add_argument("--only", nargs="+", default=None, help="subset of figure ids: 3a 3b 4 13 14")
    f.add_argument("--quick", action="store_true", help="fewer batch sizes and powers (seconds instead of minutes)")

    s = sub.add_parser("steps", help="tuned steps to target vs batch size (a table, optionally CSV)")
    s.add_argument("--batch-sizes", type=float, nargs="+", default=[2.0**k for k in range(0, 21, 2)])
    s.add_argument("--optimizer", choices=("sgd", "momentum", "ema"), default="sgd")
    s.add_argument("--momentum", default=None, help="β, or 'tune'")
    s.add_argument("--ema", default=None, help="γ, or 'tune'")
    s.add_argument("--lr", default="tune", help="learning rate, or 'tune' (default)")
    s.add_argument("--power", type=float, default=0.0, help="preconditioner P = H^power")
    s.add_argument("--target", type=float, default=0.01)
    s.add_argument("--dim", type=int, default=10_000)
    s.add_argument("--bins", type=int, default=100)
    s.add_argument("--model", choices=("nqm", "interpolation"), default="nqm")
    s.add_argument("--exhaustive", action="store_true", help="check every grid point (slower, exact grid minimum)")
    s.add_argument("--csv", default=None, help="also write the table here")

    t = sub.add_parser("fit", help="fit NQM scales to a `lightning-sgd sweep` CSV and predict other optimizers")
    t.add_argument("csv", help="CSV with columns batch_size, best_steps (and optionally reached)")
    t.add_argument("--reference", default="sgd",
                   help="the measured optimizer: sgd, momentum=<β|tune>, ema=<γ|tune> (default sgd)")
    t.add_argument("--target", type=float, default=0.01)
    t.add_argument("--out", default=None, help="folder for nqm_fit.png and nqm_fit.csv")
    return p


def _reference(text: str) -> dict:
    if text == "sgd":
        return {}
    name, _, value = text.partition("=")
    if name not in ("momentum", "ema") or not value:
        raise SystemExit(f"--reference must be sgd, momentum=<β|tune> or ema=<γ|tune>, got {text!r}")
    return {name: _tunable(value)}


def _cmd_figures(args) -> int:
    from lightning_sgd.nqm.figures import FIGURES, make_figures

    make_figures(args.out, args.only or list(FIGURES), quick=args.quick)
    return 0


def _cmd_steps(args) -> int:
    from lightning_sgd.nqm.api import steps_to_target
    from lightning_sgd.nqm.figures import _write_csv

    lr = args.lr if args.lr == "tune" else float(args.lr)
    r = steps_to_target(np.asarray(args.batch_sizes), optimizer=args.optimizer, precondition_power=args.power,
                        momentum=_tunable(args.momentum), ema=_tunable(args.ema), lr=lr, target=args.target,
                        dim=args.dim, bins=args.bins, model=args.model, exhaustive=args.exhaustive)
    d = r.as_dict()
    keys = list(d)
    print(" ".join(f"{k:>13s}" for k in keys))
    for i in range(len(r.batch_size)):
        print(" ".join(f"{d[k][i]:13.6g}" for k in keys))
    if args.csv:
        _write_csv(args.csv, [{k: float(d[k][i]) for k in keys} for i in range(len(r.batch_size))])
    return 0


PREDICTIONS = {
    "sgd": {},
    "momentum (tuned)": {"momentum": "tune"},
    "sgd, P=H^0.5": {"precondition_power": 0.5},
    "momentum (tuned), P=H^0.5": {"momentum": "tune", "precondition_power": 0.5},
    "ema (tuned)": {"ema": "tune"},
}


def _cmd_fit(args) -> int:
    from lightning_sgd.nqm.figures import _plt, _write_csv
    from lightning_sgd.nqm.fit import fit_to_measurement, read_sweep_csv

    bs, steps = read_sweep_csv(args.csv)
    fit = fit_to_measurement(bs, steps, reference=_reference(args.reference), target=args.target)
    print(f"batch_scale {fit.batch_scale:.4g}  step_scale {fit.step_scale:.4g}  "
          f"rms log error {fit.rms_log_error:.3f}  (S(B) = step_scale * S_nqm(B / batch_scale))")
    grid = 2.0 ** np.arange(np.floor(np.log2(bs.min())) - 2, np.ceil(np.log2(bs.max())) + 5)
    preds = {name: fit.predict(grid, **kw) if kw or fit.reference else fit.predict(grid) for name, kw in
             PREDICTIONS.items()}
    print(f"{'batch':>10s} " + " ".join(f"{n:>26s}" for n in preds))
    for i, b in enumerate(grid):
        print(f"{b:10.0f} " + " ".join(f"{preds[n][i]:26.4g}" for n in preds))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        rows = [{"batch_size": float(b), **{n: float(preds[n][i]) for n in preds}} for i, b in enumerate(grid)]
        _write_csv(os.path.join(args.out, "nqm_fit.csv"), rows)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        ax.plot(bs, steps, "ko", label="measured")
        for n, v in preds.items():
            ax.plot(grid, v, label=f"NQM: {n}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("Batch size")
        ax.set_ylabel("Steps to target")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "nqm_fit.png"), dpi=120)
        print(f"wrote {os.path.join(args.out, 'nqm_fit.png')} and nqm_fit.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return {"figures": _cmd_figures, "steps": _cmd_steps, "fit": _cmd_fit}[args.cmd](args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
