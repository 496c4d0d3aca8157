"""Two sweep workers share one sweep through a real PostgreSQL server that this test starts (Debian's postgresql
package; skipped with the reason when the server cannot start or psycopg2 is missing)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.test_sweep import REPO, sweep_args, write_recipe

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg2", reason="psycopg2 (pip install psycopg2-binary) is needed for PostgreSQL storage")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    # The server refuses to run as root: run it as the `postgres` user when we are root.
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        as_user = [runuser, "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="sweep-pg-")
    data = os.path.join(root, "data")
    port = _free_port()
    try:
        os.chmod(root, 0o755)
        if as_user:
            shutil.chown(root, "postgres")
        subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-o", options, "-w",
                        "-t", "60", "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError, LookupError) as err:
        detail = getattr(err, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {err} {detail.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_sweep_in_postgres(tmp_path, postgres_url):
    # Each step sleeps a little so the two workers overlap in time and both take trials.
    recipe = write_recipe(tmp_path / "tiny.yaml",
                          callbacks=", callbacks: [{class_path: tests.test_sweep.SleepEachStep, "
                                    "init_args: {seconds: 0.03}}]")
    args = sweep_args(recipe, f"--sweep.storage={postgres_url}", "--sweep.study_name=shared",
                      "--sweep.stop_at_best=false", max_steps=30)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    workers = []
    for i in range(2):
        workdir = tmp_path / f"worker{i}"  # separate output folders: only the storage is shared
        workdir.mkdir()
        workers.append(subprocess.Popen([sys.executable, "-m", "lightning_sgd.cli", *args], env=env, cwd=workdir,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 280
    outputs = []
    for proc in workers:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        outputs.append((proc.returncode, out.decode(), err.decode()[-3000:]))
    assert all(code == 0 for code, _, _ in outputs), outputs
    storage = optuna.storages.RDBStorage(postgres_url)
    pids = {str(p.pid) for p in workers}
    seen_workers = set()
    for b in (8, 32):
        trials = optuna.load_study(study_name=f"shared-bs{b}", storage=storage).get_trials()
        states = [t.state for t in trials]
        # The budget is 3 non-divergent trials; two workers may both start the last one (a benign race).
        assert 3 <= states.count(TrialState.COMPLETE) <= 4 and TrialState.RUNNING not in states
        seen_workers |= {t.user_attrs["worker"].rpartition(":")[2] for t in trials}
    assert seen_workers == pids, "both workers must have run trials of the shared sweep"
    # Both workers wrote the same final table (whoever finished last saw every trial).
    tables = [Path(tmp_path / f"worker{i}/runs/sweep/results.csv").read_text() for i in range(2)]
    assert tables[0] == tables[1]
