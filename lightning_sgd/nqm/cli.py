"""``lightning-sgd nqm``: the paper's NQM figures, steps-to-target tables, and fits to a measured sweep.

    lightning-sgd nqm figures --out docs/img [--only 3a 4] [--quick]
    lightning-sgd nqm steps --batch-sizes 1 16 256 4096 --momentum tune --power 0.5
    lightning-sgd nqm fit runs/sweep/results.csv --out runs/nqm_fit
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from lightning_sgd.nqm import _checks as check

__all__ = ["main"]

FIGURE_IDS = ("3a", "3b", "4", "13", "14")  # the keys of lightning_sgd.nqm.figures.FIGURES


def _number(rng: check.Range, *, tune: bool = False) -> Callable[[str], float | str]:
    """argparse type: a finite number in ``rng`` (or the word ``tune``)."""

    def parse(text: str) -> float | str:
        if tune and text == "tune":
            return text
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number{' or tune' if tune else ''}") from None
        if rng.outside(np.asarray(value)):
            raise argparse.ArgumentTypeError(f"must be finite and {rng.text()}, got {text!r}")
        return value

    return parse


def _count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _out_file(text: str) -> str:
    """argparse type: a file to write, in a folder that exists (checked before any computation)."""
    folder = os.path.dirname(os.path.abspath(text)) if text else ""
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be a file path, got {text!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist (create it first)")
    return text


def _out_folder(text: str) -> str:
    """argparse type: a folder to write into (created before any computation)."""
    if not text or (os.path.exists(text) and not os.path.isdir(text)):
        raise argparse.ArgumentTypeError(f"must be a folder, got {text!r}")
    return text


def _in_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _reference(text: str) -> dict:
    """argparse type: the measured optimizer, ``sgd``, ``momentum=<β|tune>`` or ``ema=<γ|tune>`` (β, γ in [0, 1))."""
    if text == "sgd":
        return {}
    name, _, value = text.partition("=")
    if name not in ("momentum", "ema") or not value:
        raise argparse.ArgumentTypeError(f"must be sgd, momentum=<β|tune> or ema=<γ|tune>, got {text!r}")
    try:
        return {name: _number(check.UNIT_OPEN, tune=True)(value)}
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{name} {err}") from None


POSITIVE, POWER, BETA = _number(check.POSITIVE), _number(check.UNIT), _number(check.UNIT_OPEN, tune=True)


def _written(path: str, write: Callable[..., Any], *args: Any) -> None:
    """``write(path, *args)``; an OSError (a full disk, a permission) names the file it was writing."""
    try:
        write(path, *args)
    except OSError as err:
        raise OSError(err.errno, f"could not write it ({err.strerror or err})", path) from err


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="lightning-sgd nqm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("figures", help="write Figures 3a, 3b(+3c), 4, 13, 14 of Zhang et al. 2019 (PNG + CSV)")
    f.add_argument("--out", type=_out_folder, default="runs/nqm", help="output folder (default: runs/nqm)")
    f.add_argument("--only", nargs="+", choices=FIGURE_IDS, default=None, help="subset of figure ids: 3a 3b 4 13 14")
    f.add_argument("--quick", action="store_true", help="fewer batch sizes and powers (seconds instead of minutes)")

    s = sub.add_parser("steps", help="tuned steps to target vs batch size (a table, optionally CSV)")
    s.add_argument("--batch-sizes", type=POSITIVE, nargs="+", default=[2.0**k for k in range(0, 21, 2)],
                   help="NQM batch sizes, finite and > 0")
    s.add_argument("--optimizer", choices=("sgd", "momentum", "ema"), default="sgd")
    s.add_argument("--momentum", type=BETA, default=None, help="β in [0, 1), or 'tune'")
    s.add_argument("--ema", type=BETA, default=None, help="γ in [0, 1), or 'tune'")
    s.add_argument("--lr", type=_number(check.POSITIVE, tune=True), default="tune",
                   help="learning rate > 0, or 'tune' (default)")
    s.add_argument("--power", type=POWER, default=0.0, help="preconditioner P = H^power, power in [0, 1]")
    s.add_argument("--target", type=POSITIVE, default=0.01, help="risk to reach, > 0 (default 0.01)")
    s.add_argument("--dim", type=_count, default=10_000)
    s.add_argument("--bins", type=_count, default=100)
    s.add_argument("--model", choices=("nqm", "interpolation"), default="nqm")
    s.add_argument("--exhaustive", action="store_true", help="check every grid point (slower, exact grid minimum)")
    s.add_argument("--csv", type=_out_file, default=None, help="also write the table here")

    t = sub.add_parser("fit", help="fit NQM scales to a `lightning-sgd sweep` CSV and predict other optimizers")
    t.add_argument("csv", type=_in_file, help="CSV with columns batch_size, best_steps (and optionally reached)")
    t.add_argument("--reference", type=_reference, default={},
                   help="the measured optimizer: sgd, momentum=<β|tune>, ema=<γ|tune> (default sgd)")
    t.add_argument("--target", type=POSITIVE, default=0.01, help="risk the NQM reaches, > 0 (default 0.01)")
    t.add_argument("--out", type=_out_folder, default=None, help="folder for nqm_fit.png and nqm_fit.csv")
    return p, {"figures": f, "steps": s, "fit": t}


def _cmd_figures(args: argparse.Namespace) -> int:
    from lightning_sgd.nqm.figures import make_figures

    make_figures(args.out, args.only or list(FIGURE_IDS), quick=args.quick)
    return 0


def _cmd_steps(args: argparse.Namespace) -> int:
    from lightning_sgd._files import write_csv
    from lightning_sgd.nqm.api import steps_to_target

    r = steps_to_target(np.asarray(args.batch_sizes), optimizer=args.optimizer, precondition_power=args.power,
                        momentum=args.momentum, ema=args.ema, lr=args.lr, target=args.target,
                        dim=args.dim, bins=args.bins, model=args.model, exhaustive=args.exhaustive)
    d = r.as_dict()
    keys = list(d)
    print(" ".join(f"{k:>13s}" for k in keys))
    for i in range(len(r.batch_size)):
        print(" ".join(f"{d[k][i]:13.6g}" for k in keys))
    if args.csv:
        _written(args.csv, write_csv, [{k: float(d[k][i]) for k in keys} for i in range(len(r.batch_size))])
    return 0


#: The optimizers ``nqm fit`` predicts. Each entry is explicit (plain SGD is ``precondition_power=0``), because
#: ``NQMFit.predict`` with no optimizer arguments predicts the measured (reference) optimizer instead.
PREDICTIONS: dict[str, dict[str, float | str]] = {
    "sgd": {"precondition_power": 0.0},
    "momentum (tuned)": {"momentum": "tune"},
    "sgd, P=H^0.5": {"precondition_power": 0.5},
    "momentum (tuned), P=H^0.5": {"momentum": "tune", "precondition_power": 0.5},
    "ema (tuned)": {"ema": "tune"},
}


def _cmd_fit(args: argparse.Namespace) -> int:
    from lightning_sgd._files import write_csv
    from lightning_sgd.nqm.figures import _plt, save_png
    from lightning_sgd.nqm.fit import fit_to_measurement, read_sweep_csv

    bs, steps = read_sweep_csv(args.csv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    fit = fit_to_measurement(bs, steps, reference=args.reference, target=args.target)
    print(f"batch_scale {fit.batch_scale:.4g}  step_scale {fit.step_scale:.4g}  "
          f"rms log error {fit.rms_log_error:.3f}  (S(B) = step_scale * S_nqm(B / batch_scale))")
    grid = 2.0 ** np.arange(np.floor(np.log2(bs.min())) - 2, np.ceil(np.log2(bs.max())) + 5)
    preds = {name: fit.predict(grid, **kw) for name, kw in PREDICTIONS.items()}
    if fit.reference:  # the measured optimizer itself, so the fitted curve can be read against the measurement
        reference = ", ".join(f"{k}={v}" for k, v in fit.reference.items())
        preds = {f"measured: {reference}": fit.predict(grid), **preds}
    print(f"{'batch':>10s} " + " ".join(f"{n:>26s}" for n in preds))
    for i, b in enumerate(grid):
        print(f"{b:10.0f} " + " ".join(f"{preds[n][i]:26.4g}" for n in preds))
    if args.out:
        rows = [{"batch_size": float(b), **{n: float(preds[n][i]) for n in preds}} for i, b in enumerate(grid)]
        _written(os.path.join(args.out, "nqm_fit.csv"), write_csv, rows)
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
        _written(os.path.join(args.out, "nqm_fit.png"), lambda path: save_png(fig, path))
        print(f"wrote {os.path.join(args.out, 'nqm_fit.png')} and nqm_fit.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (a flag, the CSV, an output path) exits with status 2 and one ``error:``
    line naming it, before any computation where it can be checked up front."""
    parser, subparsers = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"figures": _cmd_figures, "steps": _cmd_steps, "fit": _cmd_fit}[args.cmd](args)
    except (ValueError, NotImplementedError, OSError) as err:
        text = str(err) if not isinstance(err, OSError) or not err.filename else \
            f"{err.filename}: {err.strerror or err}"
        subparsers[args.cmd].error(" ".join(text.split()))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
