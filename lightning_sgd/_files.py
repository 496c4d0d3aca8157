"""Results files written atomically: a temporary file in the same folder, then ``os.replace`` onto the target.

A crash, a kill or an exception half-way through a write leaves the previous file as it was (or no file), never a
truncated one that a later ``nqm fit``, a resumed sweep or a plot would read as data. Used by the NQM's CSV and
figure outputs and the sweep's results files and plot.
"""

from __future__ import annotations

import contextlib
import csv
import os
import uuid
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a new temporary file next to ``path``; on a clean exit it is flushed, synced and renamed onto ``path``,
    on an exception it is deleted and ``path`` keeps its previous contents.

    The temporary name is unique per process and call, so concurrent writers never share one; it is opened with
    ``"x"`` so the usual umask applies (unlike ``tempfile.mkstemp``'s 0600).
    """
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows (dicts) as CSV with the union of their keys as the header, in first-seen order; atomic."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
