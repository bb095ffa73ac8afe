"""`harness tune --storage postgresql://...` against a real, throwaway PostgreSQL server: two
workers on one study, one killed with SIGKILL mid-trial; its trial is failed by its stale
heartbeat and retried (RetryHeartbeatStaleTrialCallback), and the study completes.

The server: initdb + pg_ctl on a free loopback port in a temporary directory (as the
`postgres` user when run as root: initdb refuses root). Skipped, with the reason, when the
PostgreSQL binaries or the psycopg2 client are absent (`.ci/run` installs both)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from harness.store import open_storage

SMALL = """
model = "sasrec"
pruner = "none"
[fixed]
hidden = 16
inner = 32
[space]
layers = { type = "int", low = 1, high = 2 }
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
"""
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HARNESS_AUTO_FETCH": "0"}


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may hold links to some tools only
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture(scope="module")
def postgres_url():
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (initdb): apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the psycopg2 client is not installed: pip install psycopg2-binary")
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="harness-pg-"))  # not under pytest's 0700 tmp dirs
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            shutil.chown(root, "postgres")
        except LookupError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_postgres, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "harness", "--no-sync")
    pg("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "harness", "optuna")
        yield f"postgresql://harness@127.0.0.1:{port}/optuna"
    finally:
        pg("pg_ctl", "-D", str(root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_killed_worker_is_failed_by_heartbeat_and_retried(postgres_url, tmp_path):
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    args = ["--results-dir", str(tmp_path / "results"), "tune", "--dataset", "synthetic", "--study", str(study),
            "--storage", postgres_url, "--device", "cpu", "--epochs", "5", "--trials", "8", "--workers", "2",
            "--heartbeat", "1"]
    out = tmp_path / "tune.log"
    parent = subprocess.Popen([sys.executable, "-m", "harness", *args], env={**os.environ, **ENV},
                              stdout=open(out, "w"), stderr=subprocess.STDOUT)
    storage, victim, deadline = open_storage(postgres_url), None, time.time() + 120
    try:
        while victim is None and time.time() < deadline and parent.poll() is None:
            time.sleep(0.1)
            try:
                trials = optuna.load_study(study_name="sasrec-synthetic", storage=storage).get_trials()
            except KeyError:  # not created yet
                continue
            for t in trials:  # a worker's trial past its first epoch: kill that worker
                if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("epochs", 0) >= 1:
                    victim = t
                    os.kill(t.user_attrs["worker"]["pid"], signal.SIGKILL)
                    break
        parent.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        parent.kill()
        parent.wait()
    output = out.read_text()
    assert victim is not None, output
    pid = victim.user_attrs["worker"]["pid"]
    assert pid != parent.pid and f"(pid {pid}) was killed by signal 9" in output
    assert parent.returncode == 0, output  # the other worker made up for it

    trials = optuna.load_study(study_name="sasrec-synthetic", storage=storage).get_trials()
    states = optuna.trial.TrialState
    assert trials[victim.number].state == states.FAIL  # by its stale heartbeat
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == states.COMPLETE, output
    assert retries[0].params == victim.params and retries[0].user_attrs["retry_of"] == victim.number
    assert retries[0].user_attrs["worker"]["pid"] != pid
    assert sum(t.state == states.COMPLETE for t in trials) >= 8
    assert not [t for t in trials if t.state in (states.RUNNING, states.WAITING)]
    assert [t.number for t in trials] == list(range(len(trials)))
