"""How long ``lightning-sgd --help`` takes, next to what it cost when the dispatcher imported Lightning.

Each round runs, in a rotated order (so a slow patch of a shared machine hits all alike), a fresh Python process for:

- ``help``: ``lightning-sgd --help`` (the console script when installed, else ``python -m lightning_sgd.cli``);
- ``version``: ``lightning-sgd --version``;
- ``recipes``: ``lightning-sgd recipes``;
- ``heavy import``: ``python -c "import lightning_sgd.fit_cli"``, the imports the old dispatcher paid before printing
  its help (LightningCLI of both Lightning packages, torch);
- ``python``: ``python -c pass``, the interpreter's own start-up.

Wall-clock seconds per process; the median over rounds is printed with the ratio heavy import / help. Target: help
well under a second.

    python benchmarks/cli_help.py             # 7 rounds, ~1 min on 2 CPU cores
    python benchmarks/cli_help.py --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, list[str]]:
    script = shutil.which("lightning-sgd") or str(Path(sys.executable).parent / "lightning-sgd")
    cli = [script] if Path(script).exists() else [sys.executable, "-m", "lightning_sgd.cli"]
    return {
        "help": [*cli, "--help"],
        "version": [*cli, "--version"],
        "recipes": [*cli, "recipes"],
        "heavy import": [sys.executable, "-c", "import lightning_sgd.fit_cli"],
        "python": [sys.executable, "-c", "pass"],
    }


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    commands = _commands()
    names = list(commands)
    times: dict[str, list[float]] = {name: [] for name in names}
    _time(commands["heavy import"])  # warm the file cache once: every timed run reads warm files
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_time(commands[name]))
    print(f"{'command':<14s} {'median s':>9s} {'min s':>7s} {'max s':>7s}   ({args.rounds} rounds, wall clock)")
    for name in names:
        t = times[name]
        print(f"{name:<14s} {statistics.median(t):9.3f} {min(t):7.3f} {max(t):7.3f}")
    ratio = statistics.median([h / q for h, q in zip(times["heavy import"], times["help"])])
    print(f"\nlightning-sgd --help: {statistics.median(times['help']):.3f} s (target < 1 s); the imports the old "
          f"dispatcher paid first take {ratio:.1f}x as long (median of per-round ratios).")


if __name__ == "__main__":
    main()
