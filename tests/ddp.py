"""Run a function under a real 2-process CPU DDP (gloo) job, the way users launch ``strategy="ddp"``.

A test calls ``run_ddp("tests.some_module:entry", tmp_path, **kwargs)``. That starts
``python -m tests.ddp <target> <outdir> <json kwargs>`` in a subprocess; the entry function builds its own
``Trainer(accelerator="cpu", devices=2, strategy=...)``, and Lightning's launcher re-executes the same command for
rank 1. Each rank calls :func:`dump` to save a JSON-serializable result; ``run_ddp`` returns them as
``[rank0_result, rank1_result]``. The entry function must live in an importable module (not a test file's
closure), take ``(outdir: Path, **kwargs)``, and should be cheap (each job costs ~10 s of process start-up).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def dump(outdir: str | Path, rank: int, result: Any) -> None:
    """Save one rank's result (called inside the DDP job)."""
    path = Path(outdir) / f"rank{rank}.json"
    path.write_text(json.dumps(result))


def run_ddp(target: str, outdir: str | Path, *, nprocs: int = 2, timeout: float = 180, **kwargs: Any) -> list[Any]:
    """Run ``target`` ("module:function") as a DDP job and return each rank's dumped result."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "LSGD_DDP_NPROCS": str(nprocs)}
    cmd = [sys.executable, "-m", "tests.ddp", target, str(outdir), json.dumps(kwargs)]
    proc = subprocess.run(cmd, cwd=outdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"DDP job {target} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    results = []
    for rank in range(nprocs):
        path = outdir / f"rank{rank}.json"
        if not path.exists():
            raise RuntimeError(f"DDP job {target}: rank {rank} wrote no result.\n{proc.stderr[-8000:]}")
        results.append(json.loads(path.read_text()))
    return results


def ddp_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Trainer arguments for a 2-process CPU DDP job (use inside the entry function)."""
    from tests.helpers import fast_trainer_kwargs

    kwargs = fast_trainer_kwargs(devices=int(os.environ.get("LSGD_DDP_NPROCS", "2")), strategy="ddp")
    kwargs.update(overrides)
    return kwargs


if __name__ == "__main__":
    target, outdir, raw_kwargs = sys.argv[1], sys.argv[2], sys.argv[3]
    module_name, function_name = target.split(":")
    getattr(importlib.import_module(module_name), function_name)(Path(outdir), **json.loads(raw_kwargs))
