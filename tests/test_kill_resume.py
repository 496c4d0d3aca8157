"""Kill -9 a real training process mid-epoch, resume it from its last checkpoint, and get the uninterrupted run:
bit-identical final weights (raw and EMA) and every logged measurement (GNS, B_noise, diversity, curvature) equal,
on the MNIST-1D recipe (small) with every measurement callback and EMAWeights; on one process and on a 2-process
CPU DDP job (the whole process group is killed)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 45  # 10 steps per epoch: the kill lands mid-epoch (checkpoints every 5 steps)

#: Logged keys that are not measurements of the run: wall-clock timings, and the recipe module's own epoch-level
#: aggregates (Lightning does not checkpoint a partly accumulated on_epoch metric, so the epoch the kill interrupted
#: aggregates only its resumed steps).
NOT_COMPARED = ("seconds", "_epoch")


#: what a DDP test in this process may have left in the environment (a fresh job picks its own port and ranks)
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def _run(root: Path, devices: int, ckpt: Path | None = None, slow_after: int | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DEVICES=str(devices))
    if slow_after is not None:
        env["SLOW_AFTER"] = str(slow_after)
    args = [sys.executable, "-m", "tests.kill_resume_entry", str(root), str(MAX_STEPS)] + ([str(ckpt)] if ckpt else [])
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the DDP worker is killed with it


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]


def _measurements(root: Path) -> dict[tuple[int, str], str]:
    out = {}
    for path in sorted(root.glob("csv/version_*/metrics.csv")):  # the resumed run writes a second version
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if value and key not in ("epoch", "step") and not any(tag in key for tag in NOT_COMPARED):
                    out[(int(row["step"]), key)] = value
    return out


def _step_of(path: Path) -> int:
    return int(path.stem.split("=")[1].split("-")[0])


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.ddp)])
def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, devices):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_run(straight, devices))
    proc = _run(killed, devices, slow_after=20)
    deadline = time.monotonic() + 180
    while not (killed / "ckpt" / "step=25.ckpt").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 25"
        time.sleep(0.05)
    time.sleep(0.5)  # a few steps past the checkpoint, mid-epoch
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the job, as a preemption would
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # Resume from step 25, mid-epoch (its write finished long before the kill: the run slept 0.3 s per step since);
    # a later checkpoint the kill may have cut short is not used.
    last = killed / "ckpt" / "step=25.ckpt"
    torch.load(last, map_location="cpu", weights_only=False)
    _finish(_run(killed, devices, ckpt=last))

    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    for part in ("weights", "raw"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs after the resume"
    ma, mb = _measurements(straight), _measurements(killed)
    resumed = {k: v for k, v in mb.items() if k[0] > _step_of(last)}
    measured = [k for k in resumed if k[1].split("/")[0] in ("gns", "diversity", "curvature")]
    assert len(measured) > 20, sorted(resumed)[:10]
    differ = {k: (ma.get(k), v) for k, v in resumed.items() if ma.get(k) != v}
    assert not differ, differ
