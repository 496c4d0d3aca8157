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
    index = 0 if clock == "cpu" else 1
    out = {}
    for name in configs:
        ratios = [m[name][index] / m[reference][index] for m in per_round]
        walls = [m[name][1] / m[reference][1] for m in per_round]
        out[name] = {
            "cpu_s": statistics.median(m[name][0] for m in per_round),
            "wall_s": statistics.median(m[name][1] for m in per_round),
            "ratio": statistics.median(ratios),
            "spread": [min(ratios), max(ratios)],
            "ratios": ratios,
            "ratio_wall": statistics.median(walls),
        }
    return out


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
