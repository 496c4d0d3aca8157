"""A finished (or running) training run's logged metrics, read back from its CSV log or its W&B offline run.

:func:`load_run` takes what a user has at hand: a run folder (``runs/`` picks its newest CSV log), a CSV log folder
(``runs/csv/version_3``), its ``metrics.csv``, or a W&B offline run folder (``runs/wandb/offline-run-...``). The
result maps each metric key to its ``(steps, values)`` series and carries the run's resolved configuration when
one was saved with it (``config.yaml`` beside the CSV log or in the W&B run's files, or the W&B run config).
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunLog:
    """Metric series of one run: ``series[key] = (steps, values)``, steps ascending, one value per step (the last
    one logged at that step)."""

    source: Path  # the file the metrics were read from
    folder: Path  # the run's own folder (where its report goes by default)
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved LightningCLI config, when saved
    name: str = ""

    def __contains__(self, key: str) -> bool:
        return bool(self.series.get(key, ([], []))[0])

    def steps(self, key: str) -> list[int]:
        return self.series.get(key, ([], []))[0]

    def values(self, key: str) -> list[float]:
        return self.series.get(key, ([], []))[1]

    def last(self, key: str) -> tuple[int, float] | None:
        """The last (step, value) of ``key``, or ``None`` when it was never logged."""
        steps, values = self.series.get(key, ([], []))
        return (steps[-1], values[-1]) if steps else None

    def at(self, key: str, step: int) -> float | None:
        """The value of ``key`` logged at exactly ``step``, or ``None``."""
        steps, values = self.series.get(key, ([], []))
        try:
            return values[steps.index(step)]
        except ValueError:
            return None

    def at_or_before(self, key: str, step: int) -> float | None:
        """The value of ``key`` in force at ``step``: the last one logged at or before it (else the first one after,
        for a value logged a little after the measurement it describes); ``None`` when never logged."""
        steps, values = self.series.get(key, ([], []))
        if not steps:
            return None
        index = bisect.bisect_right(steps, step) - 1
        return values[max(index, 0)]

    def measured_keys(self) -> list[str]:
        return sorted(k for k in self.series if k in self)

    def matching(self, prefix: str) -> Iterator[str]:
        return (k for k in self.measured_keys() if k.startswith(prefix))


def _number(text: Any) -> float | None:
    if text is None or text == "":
        return None
    if isinstance(text, bool):
        return float(text)
    if isinstance(text, (int, float)):
        return float(text)
    if isinstance(text, str):
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _series_from_rows(rows: list[tuple[int, Mapping[str, Any]]]) -> dict[str, tuple[list[int], list[float]]]:
    by_key: dict[str, dict[int, float]] = {}
    for step, row in rows:
        for key, raw in row.items():
            value = _number(raw)
            if value is None or key in ("step", "epoch", "trainer/global_step", "_step", "_runtime", "_timestamp"):
                continue
            by_key.setdefault(key, {})[step] = value
    if any(step is not None for step, _ in rows):
        for step, row in rows:  # epochs are worth keeping as a series too (x axis for epoch-level values)
            epoch = _number(row.get("epoch"))
            if epoch is not None:
                by_key.setdefault("epoch", {})[step] = epoch
    return {key: (sorted(d), [d[s] for s in sorted(d)]) for key, d in by_key.items()}


def read_csv_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Series of a Lightning ``CSVLogger`` ``metrics.csv`` (a ``step`` column and one column per key)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            if step is not None and math.isfinite(step):
                rows.append((int(step), row))
    return _series_from_rows(rows)


def _latest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def load_run(path: str | Path) -> RunLog:
    """Read a run from a run folder, a CSV log folder or file, or a W&B offline run folder (see the module doc).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no run log, with what was looked for.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"RUN {str(path)!r} does not exist; pass a run folder (runs/), a CSV log folder or "
                                "its metrics.csv, or a W&B offline run folder (runs/wandb/offline-run-...).")
    if path.is_file() and path.suffix == ".csv":
        return _load_csv(path)
    if path.is_file() and path.suffix == ".wandb":
        return _load_wandb(path.parent)
    if path.is_dir():
        if (path / "metrics.csv").is_file():
            return _load_csv(path / "metrics.csv")
        if any(path.glob("run-*.wandb")):
            return _load_wandb(path)
        newest = _latest(list(path.glob("csv/version_*/metrics.csv")) + list(path.glob("*/version_*/metrics.csv"))
                         + list(path.glob("version_*/metrics.csv")))
        if newest is not None:
            return _load_csv(newest)
        newest = _latest([p.parent for p in path.glob("wandb/offline-run-*/run-*.wandb")]
                         + [p.parent for p in path.glob("offline-run-*/run-*.wandb")])
        if newest is not None:
            return _load_wandb(newest)
    raise FileNotFoundError(f"RUN {str(path)!r} holds no run log: expected a metrics.csv (Lightning CSVLogger) or a "
                            "W&B offline run (run-*.wandb), in it or under csv/version_*/ or wandb/offline-run-*/.")


def _load_csv(path: Path) -> RunLog:
    run = RunLog(source=path, folder=path.parent, series=read_csv_metrics(path), name=path.parent.name)
    for candidate in ("config.yaml", "hparams.yaml"):
        config = _load_yaml(path.parent / candidate)
        if config:
            run.config = config
            break
    return run


def _load_wandb(folder: Path) -> RunLog:
    from lightning_sgd.wandb_offline import read_run

    offline = read_run(folder)
    rows = []
    for row in offline.history:
        step = _number(row.get("trainer/global_step", row.get("_step")))
        if step is not None and math.isfinite(step):
            rows.append((int(step), row))
    run = RunLog(source=offline.path, folder=folder, series=_series_from_rows(rows),
                 name=offline.name or offline.run_id)
    saved = folder / "files" / "config.yaml"
    config = _load_yaml(saved) if saved.is_file() else {}
    run.config = config if "model" in config or "trainer" in config else dict(offline.config)
    return run


def find_optimizer(config: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(lr, momentum)`` of the model's optimizer in a resolved LightningCLI config (``model.init_args.optimizer``
    or ``optimizer``), ``None`` where absent. Adam's ``betas[0]`` is not a heavy-ball momentum and is not returned."""

    def walk(node: Any) -> Iterator[Mapping[str, Any]]:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "optimizer" and isinstance(value, Mapping):
                    yield value
                yield from walk(value)

    for optimizer in walk(config):
        args = optimizer.get("init_args", optimizer)
        if isinstance(args, Mapping) and _number(args.get("lr")) is not None:
            momentum = _number(args.get("momentum"))
            return _number(args.get("lr")), momentum
    return None, None

