"""Read a W&B offline run (``.../wandb/offline-run-*/run-<id>.wandb``) back without the network.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) then LevelDB-log records
(32 KiB blocks; each record has a 7-byte header: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST) whose
payloads are serialized ``wandb_internal_pb2.Record`` protos. :func:`read_run` keeps what a report needs: the run's
name, group and project, its config, its history rows and the metric definitions (``define_metric``).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (missing ':W&B' header)")
    records, pending, pos = [], b"", 7
    while pos + _HEADER <= len(data):
        block_left = _BLOCK - (pos % _BLOCK)
        if block_left < _HEADER:  # block trailer padding
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            records.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            records.append(pending + payload)
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - (pos % _BLOCK) if pos % _BLOCK else 0
    return records


def _parse(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline W&B run file holds, as plain Python values."""

    path: Path  # the run-*.wandb file
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # key -> value (W&B's {"value": ...} unwrapped)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged row
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # define_metric: name -> {summary, hidden, ...}
    complete: bool = False  # the run's exit record was written

    def keys(self) -> set[str]:
        """Every key that appears in some history row."""
        return {key for row in self.history for key in row}


def find_run_file(run_dir: str | Path) -> Path | None:
    """The ``run-*.wandb`` file of an offline run folder (or the file itself); ``None`` when there is none yet."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    files = sorted(run_dir.glob("run-*.wandb"))
    return files[0] if files else None


def read_run(run_dir: str | Path, timeout: float = 0.0) -> OfflineRun:
    """Parse the offline run in ``run_dir`` (``.../offline-run-*`` or its ``run-*.wandb`` file).

    ``wandb.finish()`` can return before W&B's service has written the whole file; with ``timeout > 0`` this waits up
    to that many seconds for the run's ``exit`` record.

    Raises:
        FileNotFoundError: no ``run-*.wandb`` file in ``run_dir``.
    """
    deadline = time.monotonic() + timeout
    while True:
        path = find_run_file(run_dir)
        records = _parse(path) if path is not None else []
        complete = any(r.WhichOneof("record_type") == "exit" for r in records)
        if complete or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if path is None:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}: not a W&B offline run folder.")
    run = OfflineRun(path=path, complete=complete)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project = r.run_id or run.run_id, r.project or run.project
            run.name, run.group = r.display_name or run.name, r.run_group or run.group
            for item in r.config.update:
                _set_config(run.config, _key(item), item.value_json)
        elif kind == "config":
            for item in record.config.update:
                _set_config(run.config, _key(item), item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "metric":
            m = record.metric
            name = m.name or m.glob_name
            summary = [s for s in ("min", "max", "mean", "best", "last") if getattr(m.summary, s, False)]
            run.metrics[name] = {"summary": summary, "hidden": bool(m.options.hidden),
                                 "step_metric": m.step_metric}
    return run


def _set_config(config: dict[str, Any], key: str, value_json: str) -> None:
    value = json.loads(value_json)
    if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
        value = value["value"]  # W&B wraps each top-level config entry as {"value": ...}
    if key.startswith("_wandb"):
        return
    config[key] = value
