"""Read metrics back from a W&B offline run (``offline-run-*/run-<id>.wandb``) without the network, for tests.

A thin wrapper over :mod:`lightning_sgd.wandb_offline` (the reader ``lightning-sgd report`` uses) that waits for the
run to be complete: ``wandb.finish()`` returns before W&B's service has created and written the offline file (on a
loaded machine it can be missing or hold only its header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_sgd.wandb_offline import OfflineRun, read_run


def read_complete_run(run_dir: str | Path, timeout: float = 60.0) -> OfflineRun:
    """The offline run in ``run_dir``, waiting up to ``timeout`` s for its ``exit`` record."""
    return read_run(run_dir, timeout=timeout)


def read_history(run_dir: str | Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """All history rows (dicts of key → value) logged to the offline run in ``run_dir`` (``.../offline-run-*``)."""
    return read_complete_run(run_dir, timeout).history


def logged_keys(run_dir: str | Path) -> set[str]:
    """Every metric key that appears in some history row."""
    return read_complete_run(run_dir).keys()
