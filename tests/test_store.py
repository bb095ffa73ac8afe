"""harness/store.py: opening storages (and repairing a journal's torn last record), worker
liveness, failing and retrying dead workers' trials, claims, artifacts. The race of a killed
worker whose retry nobody ran is built here deterministically (a finished study plus one
RUNNING trial of a dead pid), so no outcome depends on which process is faster."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import optuna
import pytest

from harness.errors import HarnessError
from harness.locks import FileLock
from harness.runs import RunSpec
from harness.store import (open_storage, pending_retries, process_alive, recover, repair_torn_journal,
                           requeue, this_worker)
from harness.studies import TuneJob, load_study_file
from harness.tune import open_study, run_worker, tune

SMALL = """
model = "sasrec"
trials = 2
pruner = "none"
sampler = { name = "random", seed = 0 }
[fixed]
hidden = 8
inner = 16
[space]
layers = { type = "int", low = 1, high = 2 }
"""
STATES = optuna.trial.TrialState


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _job(path: Path, tmp_path: Path, **kw) -> TuneJob:
    from harness.train import TrainConfig

    base = RunSpec(model="sasrec", dataset="synthetic", train=TrainConfig(epochs=1, device="cpu"),
                   cache_dir=tmp_path / "cache")
    return TuneJob(study_file=load_study_file(path), dataset="synthetic", base=base,
                   storage_url=str(tmp_path / "s.journal"), results_dir=tmp_path / "results", **kw)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is gone (and reaped)
    return child.pid


def test_storage_urls(tmp_path):
    journal = open_storage(str(tmp_path / "sub" / "x.journal"))
    assert isinstance(journal, optuna.storages.JournalStorage) and (tmp_path / "sub" / "x.journal").is_file()
    with pytest.raises(HarnessError, match="unsupported scheme 'redis'"):
        open_storage("redis://localhost:6379")
    with pytest.raises(HarnessError, match=r"--storage postgres://u:\*\*\*@h/db: unsupported scheme 'postgres'"):
        open_storage("postgres://u:secret@h/db")
    with pytest.raises(HarnessError, match="--storage sqlite:////nonexistent-dir/x.db: cannot open"):
        open_storage("sqlite:////nonexistent-dir/x.db")


def test_unreachable_postgres_is_one_line(tmp_path):
    pytest.importorskip("psycopg2")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HarnessError) as e:
        open_storage(f"postgresql+psycopg2://harness@127.0.0.1:{port}/optuna")
    text = str(e.value)
    assert f"--storage postgresql+psycopg2://harness@127.0.0.1:{port}/optuna: cannot open" in text
    assert "\n" not in text and "refused" in text.lower()
    # plain postgresql:// (SQLAlchemy 2.1 would pick psycopg 3) uses the installed driver
    with pytest.raises(HarnessError) as e:
        open_storage(f"postgresql://harness:secret@127.0.0.1:{port}/optuna")
    assert str(e.value).startswith(f"--storage postgresql://harness:***@127.0.0.1:{port}/optuna: cannot open (")
    assert "secret" not in str(e.value)


def test_process_alive_tells_dead_and_zombie_workers():
    me = this_worker()
    assert me["pid"] == os.getpid() and process_alive(me["pid"], me["start"])
    assert not process_alive(me["pid"], "1")  # same pid, another process (pid reuse)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from harness.store import _process_start

        start = _process_start(child.pid)
        assert process_alive(child.pid, start)
        child.send_signal(signal.SIGKILL)
        deadline = time.time() + 5
        while process_alive(child.pid, start) and time.time() < deadline:  # a zombie until reaped
            time.sleep(0.01)
        assert not process_alive(child.pid, start)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, start)


def test_dead_workers_trial_is_failed_and_enqueued_again(tmp_path):
    path = write(tmp_path, SMALL)
    storage = open_storage(str(tmp_path / "s.journal"))
    study, _ = open_study(_job(path, tmp_path), storage)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is gone
    dead = study.ask({"layers": optuna.distributions.IntDistribution(1, 2)})
    dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": child.pid, "start": None})
    alive = study.ask({"layers": optuna.distributions.IntDistribution(1, 2)})
    alive.set_user_attr("worker", this_worker())
    elsewhere = study.ask()
    elsewhere.set_user_attr("worker", {"host": "another-machine", "pid": child.pid, "start": None})
    assert recover(study) == [dead.number]
    assert recover(study) == []  # once only
    trials = study.get_trials()
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert trials[dead.number].user_attrs["fail_reason"].startswith(f"worker died (pid {child.pid}")
    assert trials[alive.number].state == trials[elsewhere.number].state == optuna.trial.TrialState.RUNNING
    retry = trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == trials[dead.number].params
    assert retry.system_attrs["failed_trial"] == dead.number  # as RetryHeartbeatStaleTrialCallback does
    assert "worker" not in retry.user_attrs
    assert not requeue(study, trials[dead.number])  # found again (another path): still one retry
    assert len([t for t in study.get_trials() if t.system_attrs.get("failed_trial") == dead.number]) == 1


def test_unlabelled_trial_is_failed_once_past_the_grace_period(tmp_path, monkeypatch):
    """A trial created just before a storage failure, never labelled nor beating: only its age
    tells it is lost, so it is failed (and retried) after the grace period, not before."""
    import harness.store as store

    study, _ = open_study(_job(write(tmp_path, SMALL), tmp_path), open_storage(str(tmp_path / "s.journal")))
    orphan = study.ask({"layers": optuna.distributions.IntDistribution(1, 2)})
    started = study.get_trials()[orphan.number].datetime_start
    monkeypatch.setattr(store, "_now", lambda: started + timedelta(seconds=store.UNLABELLED_GRACE_S - 1))
    assert recover(study) == [] and [t.number for t in store.unlabelled_running(study)] == [orphan.number]
    monkeypatch.setattr(store, "_now", lambda: started + timedelta(seconds=store.UNLABELLED_GRACE_S + 1))
    assert recover(study) == [orphan.number]
    trials = study.get_trials()
    assert trials[orphan.number].state == STATES.FAIL
    assert trials[orphan.number].user_attrs["fail_reason"].startswith("storage lost as the trial started")
    assert trials[-1].state == STATES.WAITING and trials[-1].system_attrs["failed_trial"] == orphan.number
    assert recover(study) == []  # once only


def test_tune_settles_an_unlabelled_trial_before_its_summary(tmp_path, monkeypatch):
    """The target is met but a trial is left RUNNING with no worker: tune waits for it to pass
    the grace period (a clock that moves 20 s a look), fails it, runs its retry, then summarises."""
    import harness.store as store

    job = _job(write(tmp_path, SMALL), tmp_path, trials=2)
    study, _ = open_study(job, open_storage(job.storage_url))
    dist = {"layers": optuna.distributions.IntDistribution(1, 2)}
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(params={"layers": 1}, distributions=dist, value=0.1))
    orphan = study.ask(dist)
    started = study.get_trials()[orphan.number].datetime_start
    looks = iter(range(10_000))
    monkeypatch.setattr(store, "_now", lambda: started + timedelta(seconds=20 * next(looks)))
    lines: list[str] = []
    summary = tune(job, echo=lines.append)
    trials = study.get_trials()
    assert trials[orphan.number].state == STATES.FAIL, lines
    assert sum(line.startswith(f"waiting on trial(s) {orphan.number}: running with no worker") for line in lines) == 1
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retries) == 1 and retries[0].state == STATES.COMPLETE, lines
    assert not [t for t in trials if t.state in (STATES.RUNNING, STATES.WAITING)]
    assert summary.counts == {"complete": 3, "fail": 1}, lines


def _study_with_a_dead_siblings_trial(tmp_path: Path, target: int):
    """The race of a killed worker, built by hand: `target` finished trials (the survivor's
    work) and one RUNNING trial whose worker is gone and which nobody has noticed yet."""
    path = write(tmp_path, SMALL)
    job = _job(path, tmp_path, trials=target)
    study, _ = open_study(job, open_storage(job.storage_url))
    dist = {"layers": optuna.distributions.IntDistribution(1, 2)}
    for _ in range(target):
        study.add_trial(optuna.trial.create_trial(params={"layers": 1}, distributions=dist, value=0.1))
    dead = study.ask(dist)
    dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead_pid(), "start": None})
    return job, study, dead


def test_last_worker_runs_the_retry_of_a_dead_sibling(tmp_path):
    job, study, dead = _study_with_a_dead_siblings_trial(tmp_path, target=2)
    lines: list[str] = []
    assert run_worker(job, study.study_name, echo=lines.append) is None
    trials = study.get_trials()
    assert trials[dead.number].state == STATES.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == STATES.COMPLETE, lines
    assert retry[0].params == trials[dead.number].params and retry[0].user_attrs["retry_of"] == dead.number
    assert not [t for t in trials if t.state in (STATES.RUNNING, STATES.WAITING)]
    assert f"trial {dead.number}: its worker died; failed and enqueued again" in lines


def test_parent_runs_retries_its_workers_left_before_the_summary(tmp_path):
    job, study, dead = _study_with_a_dead_siblings_trial(tmp_path, target=2)
    lines: list[str] = []
    summary = tune(job, echo=lines.append)  # "nothing to run" by count, but a retry is owed
    assert summary.counts == {"complete": 3, "fail": 1}, lines
    assert not pending_retries(study)
    assert not any("nothing to run" in line for line in lines)


def test_torn_journal_record_is_cut_off_and_said(tmp_path):
    path = tmp_path / "s.journal"
    storage = open_storage(str(path))
    study = optuna.create_study(study_name="x", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    whole = path.read_bytes()
    torn = b'{"op_code": 5, "worker_id": "dead-wor'  # a process killed mid-append
    path.write_bytes(whole + torn)
    lines: list[str] = []
    again = open_storage(str(path), echo=lines.append)
    assert len(lines) == 1 and f"dropped a torn last record ({len(torn)} bytes" in lines[0] and str(path) in lines[0]
    assert path.read_bytes() == whole and (tmp_path / "s.journal.torn").read_bytes().startswith(b'{"op_code": 5')
    study = optuna.load_study(study_name="x", storage=again)
    study.add_trial(optuna.trial.create_trial(value=2.0))  # appends stay readable
    assert [t.value for t in optuna.load_study(study_name="x", storage=open_storage(str(path))).trials] == [1.0, 2.0]
    assert repair_torn_journal(path) == 0


def test_damaged_journal_is_one_line(tmp_path):
    path = tmp_path / "s.journal"
    optuna.create_study(study_name="x", storage=open_storage(str(path)))
    path.write_bytes(b"not json\n" + path.read_bytes())
    with pytest.raises(HarnessError, match=f"--storage {path}: the journal file is damaged"):
        open_storage(str(path))


def test_damaged_journal_names_the_files_line(tmp_path):
    """A record broken in the middle of the file: the message names the journal's line, not the
    JSON decoder's "line 1" of that one record."""
    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="x", storage=open_storage(str(path)))
    for value in range(30):
        study.add_trial(optuna.trial.create_trial(value=float(value)))
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) > 20
    lines[17] = lines[17].replace(b",", b" x,", 1)  # line 18: not JSON any more
    path.write_bytes(b"".join(lines))
    with pytest.raises(HarnessError) as e:
        open_storage(str(path))
    text = str(e.value)
    assert text.startswith(f"--storage {path}: the journal file is damaged (line 18: Expecting ',' delimiter at column")
    assert "line 1 " not in text and "\n" not in text


def test_read_only_commands_refuse_a_missing_journal_and_create_nothing(tmp_path, monkeypatch):
    from harness.store import require_existing

    monkeypatch.chdir(tmp_path)
    for url in ("typo/optuna.journl", "sqlite:///typo.db"):
        with pytest.raises(HarnessError, match=f"^--storage {url}: no such file"):
            require_existing(url)
    with pytest.raises(HarnessError, match="^no study journal at studies/optuna.journal yet"):
        require_existing(None)
    assert list(tmp_path.iterdir()) == []
    require_existing("postgresql://me@nowhere:5432/optuna")  # a server: nothing to look at here
    Path("s.journal").touch()
    require_existing("s.journal")


def test_file_lock_is_exclusive_and_dropped_when_its_holder_dies(tmp_path):
    lock = tmp_path / "x.lock"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from harness.locks import FileLock; "
        "l = FileLock(%r); l.acquire(); open(%r, 'w').close(); time.sleep(600)") % (
        str(Path(__file__).resolve().parents[1]), str(lock), str(ready))])
    try:
        while not ready.exists():  # the event: the child holds the lock
            assert holder.poll() is None
            time.sleep(0.01)
        import fcntl

        with open(lock, "a") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            with FileLock(lock):  # the kernel dropped it with its holder: no wait-out
                pass
    finally:
        holder.kill()
        holder.wait()
