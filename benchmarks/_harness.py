"""Shared timing harness of the benchmarks: side-by-side ratios in rotated rounds, and results with provenance.

On a shared machine absolute times drift (up to 2× here), so only ratios measured side by side mean anything:

- every configuration runs once per round, the rounds in rotated order (round r starts from the r-th
  configuration), so a slow patch of the machine hits each of them alike;
- within a round each configuration runs ``repeats`` times and its median is taken, in process CPU time (the work
  done by this process; with one torch thread, what other jobs on the machine cost us least) and in wall time;
- per round, each configuration is divided by the reference configuration of the same round; the reported ratio is
  the median over rounds, with the per-round ratios (their spread says how noisy the run was).

:func:`write_results` stores the figures as ``benchmarks/results/<name>.json`` with the git commit, package
versions, machine and date.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def rotated(names: list[str], r: int) -> list[str]:
    """Round r's order: the configurations starting from the r-th."""
    r %= len(names)
    return names[r:] + names[:r]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any]) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call (CUDA work included: synchronized before and after)."""
    _sync()
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    _sync()
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(configs: dict[str, Callable[[], Any]], reference: str, *, rounds: int, repeats: int,
            warmup: int = 1, clock: str = "cpu") -> dict[str, dict[str, Any]]:
    """Time every configuration side by side; per configuration: median seconds (``cpu_s``, ``wall_s``), the median of
    the per-round ratios to ``reference`` on ``clock`` (``ratio``), their ``spread`` ([min, max]) and the per-round
    ``ratios``, plus the wall-clock ratio (``ratio_wall``)."""
    if reference not in configs:
        raise ValueError(f"reference {reference!r} is not one of the configurations {list(configs)}")
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    per_round: list[dict[str, tuple[float, float]]] = []
    for r in range(rounds):
        medians = {}
        for name in rotated(list(configs), r):
            times = [time_once(configs[name]) for _ in range(repeats)]
            medians[name] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
        per_round.append(medians)
    return summarize_rounds(per_round, reference, clock)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Git commit (and whether the tree had changes), versions of python, torch and ``packages``, machine, date."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "versions": versions,
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, figures: dict[str, Any], *, command: str, packages: tuple[str, ...] = ()) -> Path:
    """Write ``benchmarks/results/<name>.json``: provenance, the command that produced it, and ``figures``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command, **provenance(packages), "figures": figures}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# The Trainer benchmarks' clock, measured-time comparisons, and the options and output every script shares.

import pytorch_lightning as pl  # noqa: E402  (after the functions above, which need only torch)


class StepClock(pl.Callback):
    """(process CPU seconds, wall seconds) of every optimizer step of a ``Trainer.fit``: the time between the starts
    of consecutive steps (``on_train_batch_start`` of a step's first micro-batch), so it holds everything a step
    costs: data, forward, backward, the optimizer and every callback's hooks. ``steps(skip)`` drops the first
    ``skip`` steps (warm-up); the last step has no successor and is never counted."""

    def __init__(self) -> None:
        self._marks: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            _sync()
            self._marks.append((time.process_time(), time.perf_counter()))

    def steps(self, skip: int = 0) -> list[tuple[float, float]]:
        marks = self._marks[skip:]
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]

    def median(self, skip: int = 0) -> tuple[float, float]:
        steps = self.steps(skip)
        if not steps:
            raise ValueError(f"no timed steps after skipping {skip}: run more steps")
        return statistics.median(s[0] for s in steps), statistics.median(s[1] for s in steps)

    def mean(self, skip: int = 0) -> tuple[float, float]:
        steps = self.steps(skip)
        if not steps:
            raise ValueError(f"no timed steps after skipping {skip}: run more steps")
        return statistics.fmean(s[0] for s in steps), statistics.fmean(s[1] for s in steps)


Measured = tuple[float, float]


def summarize_rounds(per_round: list[dict[str, Measured]], reference: str | dict[str, str],
                     clock: str = "cpu") -> dict[str, dict[str, Any]]:
    """:func:`compare`'s figures from per-round (CPU, wall) seconds: per name the medians over rounds, the median of
    the per-round ratios to its reference (one name, or a mapping name -> reference name), their spread and list,
    and the wall-clock ratio."""
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    index = 0 if clock == "cpu" else 1
    names = list(per_round[0])
    refs = reference if isinstance(reference, dict) else dict.fromkeys(names, reference)
    missing = sorted({refs.get(n) for n in names} - set(names), key=str)
    if missing:
        raise ValueError(f"reference {missing} is not one of the measured names {names}")
    out = {}
    for name in names:
        ratios = [m[name][index] / m[refs[name]][index] for m in per_round]
        out[name] = {
            "cpu_s": statistics.median(m[name][0] for m in per_round),
            "wall_s": statistics.median(m[name][1] for m in per_round),
            "ratio": statistics.median(ratios),
            "spread": [min(ratios), max(ratios)],
            "ratios": ratios,
            "ratio_wall": statistics.median(m[name][1] / m[refs[name]][1] for m in per_round),
            "reference": refs[name],
        }
    return out


def compare_measured(configs: dict[str, Callable[[], Measured | dict[str, Measured]]],
                     reference: str | dict[str, str], *, rounds: int, clock: str = "cpu") -> dict[str, dict[str, Any]]:
    """:func:`compare` for configurations that time themselves (a ``Trainer.fit`` timed per step by
    :class:`StepClock`, a loop that skips its own warm-up): each call returns its (CPU, wall) seconds, or a dict of
    named (CPU, wall) figures (several statistics of one run, e.g. the median and the mean step). Rounds run in
    rotated order; ratios are taken within a round, then their median over rounds (see :func:`summarize_rounds`)."""
    per_round: list[dict[str, Measured]] = []
    for r in range(rounds):
        measured: dict[str, Measured] = {}
        for name in rotated(list(configs), r):
            result = configs[name]()
            measured.update(result if isinstance(result, dict) else {name: result})
        per_round.append(measured)
    return summarize_rounds(per_round, reference, clock)


def add_output_options(parser: Any) -> None:
    """``--quick`` (tiny sizes, 1-2 rounds: a smoke test in seconds) and ``--results-dir``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 1-2 rounds, a smoke test in seconds; writes to a temporary directory "
                             "unless --results-dir is given, so benchmarks/results only holds real runs")
    parser.add_argument("--results-dir", default=None,
                        help="directory for <name>.json (default: benchmarks/results; with --quick a temporary one)")


def summary_row(what: str, ours: str, anchor: str, ratio: float | str | None, target: str = "",
                spread: list[float] | None = None) -> dict[str, Any]:
    """One row of BENCHMARKS.md's generated table (see benchmarks/summary.py for the convention)."""
    row: dict[str, Any] = {"what": what, "ours": ours, "anchor": anchor, "ratio": ratio, "target": target}
    if spread is not None:
        row["spread"] = spread
    return row


def command_line() -> str:
    """The command that is running, as a shell line (OMP_NUM_THREADS prefixed when set; script path relative to
    the repository when inside it)."""
    import shlex
    import sys

    script = os.path.abspath(sys.argv[0])
    root = str(RESULTS.parent.parent)
    if script.startswith(root + os.sep):
        script = os.path.relpath(script, root)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join(["python", script, *sys.argv[1:]])


def save_results(name: str, figures: dict[str, Any], args: Any, *, summary: list[dict[str, Any]] = (),
                 packages: tuple[str, ...] = ()) -> Path:
    """Write ``<name>.json`` (provenance, command, figures, and the ``summary`` rows) under ``args.results_dir``,
    else a temporary directory for ``args.quick``, else benchmarks/results; returns the path."""
    import tempfile

    if args.results_dir:
        directory = Path(args.results_dir)
    elif args.quick:
        directory = Path(tempfile.mkdtemp(prefix="benchmark_quick_"))
    else:
        directory = RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "command": command_line(), **provenance(("lightning_sgd", *packages)),
               "figures": figures, "summary": [{"benchmark": name, **row} for row in summary]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
