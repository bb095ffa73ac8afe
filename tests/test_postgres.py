"""`harness tune --storage postgresql://...` against a real, throwaway PostgreSQL server: two
workers on one study, one killed with SIGKILL mid-trial; its trial is failed by its stale
heartbeat and retried once (the storage's stale-trial callback, `store.requeue`), and the study completes.

The server is conftest's `postgres_url` (skipped, with the reason, when the PostgreSQL
binaries or the psycopg2 client are absent; `.ci/run` installs both)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna

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
