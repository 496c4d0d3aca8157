"""Read metrics back from a W&B offline run file (``run-<id>.wandb``) without the network.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) then LevelDB-log records
(32 KiB blocks; each record has a 7-byte header: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST) whose
payloads are serialized ``wandb_internal_pb2.Record`` protos. We only need ``history`` records.
"""

from __future__ import annotations

import json
import struct
import time
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


def read_history(run_dir: str | Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """All history rows (dicts of key → value) logged to the offline run in ``run_dir`` (``.../offline-run-*``).

    ``wandb.finish()`` returns before W&B's service has created and written the offline file (on a loaded machine
    it can be missing or hold only its header), so this waits up to ``timeout`` s for the run's ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        records = _parse(files[0]) if files else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            if not files:
                raise FileNotFoundError(f"no run-*.wandb file in {run_dir} after {timeout:.0f} s")
            break
        time.sleep(0.2)
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def logged_keys(run_dir: str | Path) -> set[str]:
    """Every metric key that appears in some history row."""
    return {key for row in read_history(run_dir) for key in row}
