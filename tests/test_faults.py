"""Fault injection: `harness tune` with 4 workers (and experiment grids) over the journal file
and a real PostgreSQL, with a process killed or a write failed at a named moment
(harness/faults.py, HARNESS_FAULT), then the same command run again. After each fault the
invariants are checked:

- the command ends with the target met, nothing RUNNING or WAITING, every killed trial retried;
- no finished trial lost (what was COMPLETE before the rerun still is), none duplicated (a
  killed trial has one retry, an experiment cell one COMPLETE trial);
- every error is one line that names its cause (no traceback in any output).

Moments are chosen by event (the N-th epoch, the N-th artifact upload), never by sleeping, so
no outcome depends on the machine's speed. `pytest -m soak` runs the long part: random
faults (fixed seed, HARNESS_SOAK_SEED) for HARNESS_SOAK_ROUNDS rounds per storage."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from harness.store import MAX_RETRY, open_storage

STUDY = """
model = "sasrec"
trials = 6
pruner = "none"
sampler = { name = "random", seed = 0 }
[fixed]
hidden = 8
inner = 16
[space]
layers = { type = "int", low = 1, high = 2 }
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
"""
TARGET, WORKERS, EPOCHS = 6, 4, 3
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HARNESS_AUTO_FETCH": "0"}
S = optuna.trial.TrialState
KILLED = ("worker died", "interrupted", "no reason recorded", "storage lost")  # fail reasons of killed trials


@pytest.fixture
def storage_url(request, tmp_path):
    """A fresh storage of the kind the test is parametrized with ("journal" or "postgres")."""
    if request.param == "journal":
        return str(tmp_path / "optuna.journal")
    url = request.getfixturevalue("postgres_url")
    name = f"faults_{os.getpid()}_{time.monotonic_ns()}"
    _create_database(url, name)  # a database per test: studies never mix
    return url.rsplit("/", 1)[0] + "/" + name


def _create_database(url: str, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()


class Tune:
    """`harness tune` over one study, as a subprocess, with its output kept."""

    def __init__(self, tmp_path: Path, storage: str, results: Path | None = None):
        self.tmp, self.storage = tmp_path, storage
        self.results = results or tmp_path / "results"
        study = tmp_path / "faults.toml"
        study.write_text(STUDY)
        self.args = ["--results-dir", str(self.results), "tune", "--dataset", "synthetic", "--study", str(study),
                     "--storage", storage, "--device", "cpu", "--epochs", str(EPOCHS), "--trials", str(TARGET),
                     "--workers", str(WORKERS), "--heartbeat", "1"]
        self.outputs: list[str] = []

    def start(self, fault: str | None = None) -> subprocess.Popen:
        env = {**os.environ, **ENV, "HARNESS_CACHE_DIR": str(self.tmp / "cache")}
        env.pop("HARNESS_FAULT", None)
        if fault:
            env["HARNESS_FAULT"] = fault
        self.log = self.tmp / f"run{len(self.outputs)}.log"
        self.outputs.append("")
        # a shell's background job (CI run with `&`) ignores SIGINT, and a child would inherit that:
        # give the command the default disposition a terminal's foreground job has
        return subprocess.Popen([sys.executable, "-m", "harness", *self.args], env=env, stdout=open(self.log, "w"),
                                stderr=subprocess.STDOUT, preexec_fn=_default_sigint)

    def finish(self, process: subprocess.Popen, timeout: float = 300) -> int:
        try:
            code = process.wait(timeout=timeout)
        finally:
            process.kill()
            process.wait()
        self.outputs[-1] = self.log.read_text()
        return code

    def run(self, fault: str | None = None) -> int:
        return self.finish(self.start(fault))

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="sasrec-synthetic", storage=open_storage(self.storage))

    def complete(self) -> set[int]:
        try:
            return {t.number for t in self.study().get_trials(states=(S.COMPLETE,))}
        except KeyError:
            return set()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def check_invariants(tune: Tune, complete_before: set[int]) -> dict:
    """The invariants after the rerun; returns the figures of the table in the closing note."""
    trials = tune.study().get_trials()
    states = [t.state for t in trials]
    output = "\n".join(tune.outputs)
    assert "Traceback" not in output, output
    assert sum(s in (S.COMPLETE, S.PRUNED) for s in states) >= TARGET, output
    stranded = [t.number for t in trials if t.state in (S.RUNNING, S.WAITING)]
    assert not stranded, (stranded, output)
    lost = complete_before - {t.number for t in trials if t.state == S.COMPLETE}
    assert not lost, (lost, output)
    killed = [t for t in trials if t.state == S.FAIL
              and t.user_attrs.get("fail_reason", "no reason recorded").startswith(KILLED)]
    retries: dict[int, list[int]] = {}
    for t in trials:
        if t.system_attrs.get("retry_history"):
            retries.setdefault(t.system_attrs["retry_history"][-1], []).append(t.number)
    for t in killed:
        if len(t.system_attrs.get("retry_history", [])) < MAX_RETRY:
            assert len(retries.get(t.number, [])) == 1, (t.number, retries, output)  # retried, once
    assert [t.number for t in trials] == list(range(len(trials)))
    return {"killed": len(killed), "lost": len(lost), "stranded": len(stranded),
            "duplicated": sum(len(v) - 1 for v in retries.values())}


def _wait_for_epoch(tune: Tune, process: subprocess.Popen) -> None:
    """The event: some trial has reported an epoch (so a worker is mid-trial)."""
    deadline = time.monotonic() + 240  # a guard against a hang, not a timing assumption
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if any(t.state == S.RUNNING and t.intermediate_values for t in tune.study().get_trials()):
                return
        except KeyError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no trial reached an epoch: {tune.log.read_text()}")


# --------------------------------------------------------------------------------- fast part (CI)
# Every fault runs over the journal in CI; over PostgreSQL, CI runs the faults whose handling
# differs there (a killed worker found by heartbeat, a server restart, cell claims by advisory
# lock) and the soak (`-m soak`) runs the rest, to keep CI within its time.

BOTH = pytest.mark.parametrize("storage_url", ["journal", "postgres"], indirect=True)
JOURNAL = pytest.mark.parametrize("storage_url", ["journal", pytest.param("postgres", marks=pytest.mark.soak)],
                                  indirect=True)

# a worker killed before it names itself on its trial: over PostgreSQL the trial is found in
# seconds (heartbeat grace), over a journal only after UNLABELLED_GRACE_S, so CI runs that one there
FAST_ON = {"worker-mid-epoch": "both", "worker-before-label": "postgres"}
FAULTS = {"worker-mid-epoch": "epoch:2@1", "worker-before-label": "trial:2@1", "worker-mid-upload": "artifact:2@2",
          "parent-at-start": "workers:1@0", "parent-mid-summary": "summary:1@0"}


@pytest.mark.parametrize("storage_url, fault", [
    pytest.param(storage, fault, id=f"{storage}-{name}",
                 marks=[] if FAST_ON.get(name, "journal") in (storage, "both") else [pytest.mark.soak])
    for storage in ("journal", "postgres") for name, fault in FAULTS.items()], indirect=["storage_url"])
def test_kill_then_rerun_completes(tmp_path, storage_url, fault):
    tune = Tune(tmp_path, storage_url)
    code = tune.run(fault)
    if fault.endswith("@0"):
        assert code == -signal.SIGKILL, tune.outputs[-1]
    before = tune.complete()
    assert tune.run() == 0, tune.outputs[-1]
    figures = check_invariants(tune, before)
    if fault.startswith(("epoch", "trial")):
        assert figures["killed"] >= 1  # the worker killed itself mid-trial: that trial was retried


@JOURNAL
def test_sigkill_of_the_parent_mid_trial_then_rerun(tmp_path, storage_url):
    """The parent killed while its workers train: they die with it (no orphans), their trials
    are failed and retried by the rerun."""
    tune = Tune(tmp_path, storage_url)
    process = tune.start()
    _wait_for_epoch(tune, process)
    process.send_signal(signal.SIGKILL)
    assert tune.finish(process) == -signal.SIGKILL
    pids = [t.user_attrs["worker"]["pid"] for t in tune.study().get_trials() if "worker" in t.user_attrs]
    for pid in set(pids):  # the event: each worker is gone (PR_SET_PDEATHSIG), not a guess at how long
        _wait_gone(pid)
    before = tune.complete()
    assert tune.run() == 0, tune.outputs[-1]
    check_invariants(tune, before)


def _wait_gone(pid: int) -> None:
    from harness.store import process_alive

    deadline = time.monotonic() + 60
    while process_alive(pid, None):
        assert time.monotonic() < deadline, f"worker {pid} outlived its parent"
        time.sleep(0.05)


@JOURNAL
def test_sigint_of_the_parent_then_rerun(tmp_path, storage_url):
    tune = Tune(tmp_path, storage_url)
    process = tune.start()
    _wait_for_epoch(tune, process)
    process.send_signal(signal.SIGINT)
    assert tune.finish(process) != 0
    trials = tune.study().get_trials()
    assert not [t for t in trials if t.state == S.RUNNING], tune.outputs[-1]  # workers marked theirs
    before = tune.complete()
    assert tune.run() == 0, tune.outputs[-1]
    check_invariants(tune, before)


def test_torn_journal_record_then_rerun(tmp_path):
    tune = Tune(tmp_path, str(tmp_path / "optuna.journal"))
    tune.args[tune.args.index("--trials") + 1] = "3"
    assert tune.run() == 0, tune.outputs[-1]
    before = tune.complete()
    with open(tmp_path / "optuna.journal", "ab") as f:
        f.write(b'{"op_code": 6, "worker_id": "x", "trial_id": 1, "user_att')  # killed mid-append
    tune.args[tune.args.index("--trials") + 1] = str(TARGET)
    assert tune.run() == 0, tune.outputs[-1]
    assert "dropped a torn last record" in tune.outputs[-1]
    check_invariants(tune, before)


@pytest.mark.parametrize("storage_url", ["postgres"], indirect=True)
def test_postgres_restart_mid_study(tmp_path, storage_url, request):
    restart = request.getfixturevalue("postgres_restart")
    tune = Tune(tmp_path, storage_url)
    process = tune.start()
    _wait_for_epoch(tune, process)
    restart()
    tune.finish(process)  # workers reconnect, or fail their trial cleanly
    before = tune.complete()
    assert tune.run() == 0, "\n".join(tune.outputs)
    check_invariants(tune, before)


def test_corrupt_cached_dataset_and_lid_are_rebuilt(tmp_path):
    from harness.cache import pretrained_lid
    from harness.data.registry import load
    from models.sasrec import SASRecConfig

    cache = tmp_path / "cache"
    data = load("synthetic", tmp_path, cache)
    (cached,) = (cache / "datasets").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    again = load("synthetic", tmp_path, cache)
    assert np.array_equal(again.items, data.items)
    cfg = SASRecConfig(hidden=8, inner=16, layers=1, max_len=20)
    calls = []

    def pretrain(encoder, checkpoint):
        calls.append(1)
        return {"epochs": 0}

    pretrained_lid(cache, "h", cfg, 30, {"r": 1}, pretrain)
    (lid,) = (cache / "lid").glob("*.pt")
    lid.write_bytes(b"garbage")
    _, _, was_cached = pretrained_lid(cache, "h", cfg, 30, {"r": 1}, pretrain)
    assert not was_cached and len(calls) == 2
    _, _, was_cached = pretrained_lid(cache, "h", cfg, 30, {"r": 1}, pretrain)
    assert was_cached


def test_corrupt_cache_is_said_in_one_line(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, **ENV, "HARNESS_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "harness", "data", "stats", "synthetic"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    (cached,) = (cache / "datasets").glob("*.npz")
    cached.write_bytes(b"PK\x03\x04 truncated")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is unreadable" in lines[0] and str(cached) in lines[0]


@pytest.fixture
def small_fs(tmp_path):
    """A results directory on a tiny file system: (mount point, remount as read-only)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                          capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root); the injected ENOSPC test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_read_only_results_dir_is_refused_before_the_first_trial(tmp_path, small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    tune = Tune(tmp_path, str(tmp_path / "optuna.journal"), results=small_fs / "results")
    assert tune.run() == 1
    lines = tune.outputs[-1].strip().splitlines()
    assert lines[-1].startswith("Error: --results-dir") and "Read-only file system" in lines[-1], lines
    assert "Traceback" not in tune.outputs[-1]
    assert not (tmp_path / "optuna.journal").exists() or not tune.study().get_trials()


def test_full_results_disk_fails_trials_in_one_line_and_a_rerun_completes(tmp_path, small_fs):
    stat = os.statvfs(small_fs)
    (small_fs / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 8192))  # 8 kB left
    tune = Tune(tmp_path, str(tmp_path / "optuna.journal"), results=small_fs / "results")
    code = tune.run()  # room for the write check, not for a checkpoint
    assert code == 1, tune.outputs[-1]
    assert "Traceback" not in tune.outputs[-1]
    fails = [t for t in tune.study().get_trials() if t.state == S.FAIL]
    assert fails and all("the disk is full" in t.user_attrs["fail_reason"] for t in fails)
    tune.results = tmp_path / "results"
    tune.args[tune.args.index("--results-dir") + 1] = str(tune.results)
    assert tune.run() == 0, tune.outputs[-1]
    check_invariants(tune, set())


def test_injected_disk_full_is_one_line(tmp_path):
    tune = Tune(tmp_path, str(tmp_path / "optuna.journal"))
    tune.args[tune.args.index("--workers") + 1] = "1"
    tune.run("artifact:1:enospc")
    fails = [t for t in tune.study().get_trials() if t.state == S.FAIL]
    assert fails[0].user_attrs["fail_reason"].startswith("cannot store the run's artifacts in <injected at artifact>")
    assert "the disk is full" in fails[0].user_attrs["fail_reason"] and "Traceback" not in tune.outputs[-1]
    assert tune.run() == 0
    check_invariants(tune, set())


# ------------------------------------------------------------------------------------ experiments

@BOTH
def test_killed_cell_is_rerun_in_the_same_grid_and_none_twice(tmp_path, storage_url):
    """Two processes fill one ablation grid; one is killed mid-cell. The other claims the dead
    cell and finishes the grid; no cell has two COMPLETE trials."""
    env = {**os.environ, **ENV, "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "harness", "--results-dir", str(tmp_path / "res"), "ablate", "--dataset", "synthetic",
           "--seeds", "2", "--variants", "igr-sr/wo-lid,igr-sr/wo-icr", "--storage", storage_url, "--epochs", "2",
           "--lid-epochs", "1", "--device", "cpu", "--params", "paper"]
    victim = subprocess.Popen(cmd, env={**env, "HARNESS_FAULT": "epoch:1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    survivor = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_v, _ = victim.communicate(timeout=300)
    out_s, _ = survivor.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, out_v
    assert survivor.returncode == 0 and "Traceback" not in out_s, out_s
    study = optuna.load_study(study_name="ablate-synthetic", storage=open_storage(storage_url))
    trials = study.get_trials()
    cells = [t.user_attrs["cell"] for t in trials if t.state == S.COMPLETE]
    assert len(cells) == len(set(cells)) == 4, out_s  # every cell once
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]
    assert sum(t.state == S.FAIL for t in trials) == 1  # the killed cell, failed and run again


# ------------------------------------------------------------------------------------------ soak

SOAK_FAULTS = ["epoch:{n}@{w}", "artifact:{n}@{w}", "workers:1@0", "summary:1@0", "sigint"]


@pytest.mark.soak
@BOTH
def test_soak_random_faults(tmp_path, storage_url):
    """Rounds of a random fault at a random moment (seeded), each followed by a rerun; the
    invariants after every round, their sums printed for the closing note."""
    rng = random.Random(int(os.environ.get("HARNESS_SOAK_SEED", "2026")))
    rounds = int(os.environ.get("HARNESS_SOAK_ROUNDS", "5"))
    totals = {"rounds": 0, "killed": 0, "lost": 0, "stranded": 0, "duplicated": 0}
    for r in range(rounds):
        tmp = tmp_path / f"round{r}"
        tmp.mkdir()
        if "://" not in storage_url:
            url = str(tmp / "optuna.journal")
        else:  # a fresh database per round
            name = f"soak_{os.getpid()}_{r}_{time.monotonic_ns()}"
            _create_database(storage_url, name)
            url = storage_url.rsplit("/", 1)[0] + "/" + name
        tune = Tune(tmp, url)
        fault = rng.choice(SOAK_FAULTS).format(n=rng.randint(1, 3), w=rng.randint(1, WORKERS))
        if fault == "sigint":
            process = tune.start()
            _wait_for_epoch(tune, process)
            process.send_signal(signal.SIGINT)
            tune.finish(process)
        else:
            tune.run(fault)
        before = tune.complete()
        assert tune.run() == 0, tune.outputs[-1]
        figures = check_invariants(tune, before)
        totals["rounds"] += 1
        for key in ("killed", "lost", "stranded", "duplicated"):
            totals[key] += figures[key]
        print(f"soak round {r}: {fault}: {figures}")
    print(f"soak totals ({'postgresql' if '://' in storage_url else 'journal'}): {totals}")
