"""Where studies live, and what keeps them whole when processes die.

One module for everything tune and the experiments share about storage:
- opening a storage: a path is Optuna's journal file (several local processes append to it
  under one fcntl lock; a torn last record left by a crash is repaired on open), a URL is a
  database (RDBStorage; PostgreSQL with heartbeats, so a silent worker on any machine is found);
- who runs a trial (host, pid, process start time) and whether that process still lives;
- failing the RUNNING trials of dead workers and, for tuning, enqueueing their retries;
- claiming work atomically across processes (experiment cells);
- the artifacts a finished run leaves (checkpoint, per-user ranks, record).

Optuna's public API cannot change the state of a trial that another process was running;
`_backend` is the one place that reaches into the study for its storage, and says why.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from harness import faults
from harness.locks import FileLock
from harness.errors import HarnessError, first_line

DEFAULT_STORAGE = "studies/optuna.journal"
MAX_RETRY = 2  # a trial whose worker dies this often (e.g. killed for memory) is not retried again
UNLABELLED_GRACE_S = 60  # journal (no heartbeats): how long a trial may run before its worker names itself


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna marks heartbeats, artifacts, PED-ANOVA and grouped TPE experimental: the warning
    says nothing a user can act on, and every worker would print it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Opening a storage
# ---------------------------------------------------------------------------------------------

def open_storage(url: str | None, heartbeat: int | None = None, retry: bool = True,
                 echo: Callable[[str], None] | None = None) -> optuna.storages.BaseStorage:
    """A journal file for a path (default studies/optuna.journal), an RDBStorage for a URL.
    `heartbeat` (seconds) turns on database heartbeats; with `retry`, a trial failed for a
    stale heartbeat is enqueued again (tuning), else it is only failed (experiment cells)."""
    url = url or DEFAULT_STORAGE
    if "://" not in url:
        return _open_journal(Path(url), echo or _stderr)
    scheme, shown = url.split("://", 1)[0], safe_url(url)
    if not scheme.startswith(("sqlite", "postgresql", "mysql")):
        raise HarnessError(f"--storage {shown}: unsupported scheme {scheme!r}; use a journal file path "
                           f"(default {DEFAULT_STORAGE}), sqlite:///FILE.db or postgresql://USER@HOST:PORT/DB")
    if scheme == "postgresql":  # SQLAlchemy 2.1 means psycopg 3 by it; use the driver that is installed
        url = f"postgresql+{_postgres_driver(url)}://" + url.split("://", 1)[1]
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat}
        if retry:  # Optuna's RetryHeartbeatStaleTrialCallback, but once per trial (see requeue)
            kwargs["heartbeat_stale_trial_callback"] = requeue
    # pre-ping: a connection the server dropped (a restart) is replaced instead of failing the call
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if scheme.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(3):
            try:
                with quiet_experimental():
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
            except Exception as e:
                # processes opening a brand-new database at once race to create its tables; the
                # loser sees "duplicate key" / "already exists" and finds them made on a second try
                if attempt == 2 or not re.search(r"duplicate key|already exists", str(e)):
                    raise
    except ImportError as e:
        raise HarnessError(f"--storage {shown}: its database driver is not installed ({e}); "
                           "for PostgreSQL: pip install psycopg2-binary") from None
    except Exception as e:  # SQLAlchemy's errors for bad URLs, refused connections, bad logins
        raise HarnessError(f"--storage {shown}: cannot open ({first_line(e)})") from None


def require_existing(url: str | None) -> None:
    """For commands that only read a storage (report, studies, dashboard): a journal file (or an
    SQLite file) that does not exist is refused in one line, before anything opens it, so that a
    mistyped --storage creates no empty journal, lock or output folder."""
    shown = url or DEFAULT_STORAGE
    if "://" not in shown:
        path = Path(shown)
    elif shown.startswith("sqlite:///") and shown != "sqlite:///:memory:":
        path = Path(shown[len("sqlite:///"):])
    else:
        return  # a database server: opening it creates nothing
    if path.is_dir():
        raise HarnessError(f"--storage {shown}: is a directory, not a journal file")
    if not path.exists():
        if url is None:
            raise HarnessError(f"no study journal at {shown} yet (nothing tuned or run here): run `harness tune` "
                               "or an experiment first, or give --storage")
        raise HarnessError(f"--storage {shown}: no such file; check the path (nothing was created)")


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def _open_journal(path: Path, echo: Callable[[str], None]) -> JournalStorage:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        with lock:
            torn = repair_torn_journal(path)
        if torn:
            echo(f"warning: {path}: dropped a torn last record ({torn} bytes, left by a process killed "
                 f"mid-write); kept in {path}.torn")
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    except OSError as e:
        raise HarnessError(f"--storage {path}: cannot open the journal file ({e.strerror or e})") from None
    except ValueError as e:  # a record in the middle is not JSON: not a crash footprint, a damaged file
        raise HarnessError(f"--storage {path}: the journal file is damaged ({_damaged_line(path) or first_line(e)}); "
                           "restore it from a backup or start another --storage") from None


def _damaged_line(path: Path) -> str | None:
    """Where a journal stops being JSON, as a line of the file: "line 108: Expecting value at
    column 40" (the JSON decoder's own message counts lines and columns within one record)."""
    import json

    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as e:
                    where = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else first_line(e)
                    return f"line {number}: {reason}{where}"
    except OSError:
        return None
    return None


def repair_torn_journal(path: Path) -> int:
    """A journal record is one line written in one append; a process killed mid-append leaves a
    last line without its newline, and the next append would glue a valid record onto it and
    make the whole file unreadable. Cut it off (keeping it beside the file); call under the
    journal's lock. Returns the bytes removed."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = 0
        step = 1 << 16
        pos = size
        while pos > 0 and not keep:  # find the last newline, reading backwards
            start = max(0, pos - step)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
            pos = start
        f.seek(keep)
        torn = f.read()
        with open(str(path) + ".torn", "ab") as out:
            out.write(torn + b"\n")
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def _postgres_driver(url: str) -> str:
    import importlib.util

    for driver in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(driver) is not None:
            return driver
    raise HarnessError(f"--storage {safe_url(url)}: no PostgreSQL driver is installed; pip install psycopg2-binary")


def safe_url(url: str | None) -> str:
    """The URL without its password, for messages."""
    url = url or DEFAULT_STORAGE
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: still name it, less anything between ':' and '@'
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def is_journal(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, JournalStorage)


# ---------------------------------------------------------------------------------------------
# Workers: who runs a trial, and is it alive
# ---------------------------------------------------------------------------------------------

def this_worker() -> dict:
    """Who runs a trial; `start` tells a reused pid apart from the process that had it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat: start time in clock ticks since boot
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if fields[0] == "Z":  # killed, not yet reaped by its parent
        return False
    return start is None or fields[19] == start


def worker_is_dead(trial: FrozenTrial) -> bool:
    """True when the trial's worker ran on this host and is gone. A trial of another host
    (or one not yet labelled) is never judged here: only heartbeats can tell for it."""
    worker = trial.user_attrs.get("worker")
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    return not process_alive(worker["pid"], worker.get("start"))


# ---------------------------------------------------------------------------------------------
# Failing and retrying the trials of dead workers
# ---------------------------------------------------------------------------------------------

def _backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage. Optuna lets a process finish only the trials it runs itself; failing
    a trial whose worker died needs the storage's own set_trial_state_values, which the Study
    object keeps in a private attribute."""
    return study._storage


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark another process's RUNNING trial FAIL with `reason`; False when someone finished it
    first (the storage settles the race: a finished trial cannot be updated again)."""
    storage = _backend(study)
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """The WAITING copy Optuna's RetryHeartbeatStaleTrialCallback makes (same system attrs, so
    every path records a retry the same way), without the dead trial's user attrs. Also the
    storage's stale-heartbeat callback. False once a trial has been retried MAX_RETRY times, or
    when it already has its retry: a trial cut off by a database restart can be found both by
    its own worker (`make_objective`) and by another's heartbeat check, and must run once."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return False
    if any((t.system_attrs.get("retry_history") or [None])[-1] == trial.number
           for t in study.get_trials(deepcopy=False)):
        return False
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={"failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                      "retry_history": history}))
    return True


def recover(study: optuna.Study, retry: bool = True) -> list[int]:
    """Fail the RUNNING trials whose worker is dead, and with `retry` enqueue them again.
    This host's dead workers are found by pid at once, on any storage; a database with
    heartbeats also fails trials of any machine that went silent (its callback enqueues the
    retry). A trial that never named its worker nor beat (see `unlabelled_running`) is failed
    once it has been so for the grace period. Returns the numbers of the trials failed here."""
    failed = []
    grace = unlabelled_grace(_backend(study))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_is_dead(trial):
            worker = trial.user_attrs["worker"]
            reason = f"worker died (pid {worker['pid']} on {worker['host']})"
        elif "worker" not in trial.user_attrs and _age(trial) > grace:
            reason = (f"storage lost as the trial started: no worker recorded for it in {grace:.0f} s "
                      "(a database restart or a kill between creating the trial and labelling it)")
        else:
            continue
        if fail_trial(study, trial, reason):
            if retry:
                requeue(study, trial)
            failed.append(trial.number)
    if _heartbeat_interval(_backend(study)):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        failed += sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    return failed


def unlabelled_running(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials with no worker recorded. A worker labels its trial first thing, so one
    stays unlabelled only when the storage failed in between (a database restart cut the
    connection after the trial was created, before its label or first heartbeat was written)
    or the worker was killed in that instant. Neither the pid check nor Optuna's heartbeat
    check (which skips trials that never beat) can see such a trial; `recover` fails it by age."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" not in t.user_attrs]


def unlabelled_grace(storage: optuna.storages.BaseStorage) -> float:
    """Seconds an unlabelled trial may run before it counts as lost: the heartbeat grace period
    of a database with heartbeats (the time a silent labelled trial gets), else UNLABELLED_GRACE_S."""
    interval = _heartbeat_interval(storage)
    if not interval:
        return UNLABELLED_GRACE_S
    rdb = getattr(storage, "_backend", storage)  # a loaded study wraps its RDBStorage in a cache
    return getattr(rdb, "grace_period", None) or 2 * interval  # Optuna's own default when unset


def _now() -> datetime:
    return datetime.now()  # Optuna stamps datetime_start with the local naive clock


def _age(trial: FrozenTrial) -> float:
    return (_now() - trial.datetime_start).total_seconds() if trial.datetime_start else 0.0


def _heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    """Seconds between heartbeats of a database storage opened with them; None otherwise."""
    get = getattr(storage, "get_heartbeat_interval", None)  # the storages that can beat have it
    return get() if get is not None else None


def one_line_thread_errors(echo: Callable[[str], None]) -> None:
    """Optuna beats a database trial's heartbeat from a thread; a server restart makes that
    thread raise, and Python would print its traceback. Say it in one line instead: the
    trial goes on, and a heartbeat that stays silent is judged by the others like any other."""
    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        echo(f"warning: {args.thread.name if args.thread else 'a thread'}: "
             f"{args.exc_type.__name__}: {first_line(args.exc_value) if args.exc_value else ''}")

    threading.excepthook = hook


def is_storage_error(e: BaseException) -> bool:
    """True for a failure of the storage itself (a lost database connection), not of the run."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(e, (SQLAlchemyError, StorageInternalError))


def when_storage_answers(call: Callable[[], Any], tries: int = 8, wait: float = 1.0) -> None:
    """Run a storage call, retrying while the storage is unreachable (a restart takes seconds);
    gives up quietly after `tries`: a trial left RUNNING is then failed by its silent heartbeat."""
    for attempt in range(tries):
        try:
            call()
            return
        except Exception as e:
            if not is_storage_error(e):
                raise
            time.sleep(wait * (attempt + 1))


def pending_retries(study: optuna.Study) -> list[FrozenTrial]:
    """WAITING retries of failed trials: a study is not done while one of these waits."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if "failed_trial" in t.system_attrs]


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat for a trial that is not run by study.optimize (an experiment cell made by ask/tell),
    so that other machines can tell a live cell from a dead one. A no-op on a journal."""
    storage = _backend(study)
    interval = _heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception:  # a server restart: the pool reconnects at the next beat
                pass
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def claim_lock(storage: optuna.storages.BaseStorage, study_name: str, url: str | None) -> Iterator[None]:
    """Held while a process picks the next cell of an experiment and marks it RUNNING, so that
    two processes on one grid never run the same cell: a file lock beside a journal or SQLite
    file, a PostgreSQL advisory lock (machines share it through the server)."""
    url = url or DEFAULT_STORAGE
    if is_journal(storage) or url.startswith("sqlite:///"):
        path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else url
        with FileLock(path + ".claims.lock"):
            yield
        return
    if url.startswith("postgresql"):
        from sqlalchemy import text

        with storage.engine.connect() as conn:
            key = {"name": f"harness-claims:{study_name}"}
            conn.execute(text("SELECT pg_advisory_lock(hashtext(:name))"), key)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext(:name))"), key)
        return
    yield  # other databases: no cross-process claim (one process per experiment grid)


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------

def artifact_store(results_dir: Path):
    from optuna.artifacts import FileSystemArtifactStore

    path = results_dir / "artifacts"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarnessError(f"--results-dir {results_dir}: cannot create {path} ({e.strerror or e})") from None
    return FileSystemArtifactStore(path)


def check_writable(results_dir: Path) -> None:
    """Refuse a results directory that cannot take a file before any trial is trained for nothing."""
    path = results_dir / "artifacts"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise HarnessError(f"--results-dir {results_dir}: cannot write there ({e.strerror or e})") from None


def store_record(trial: optuna.Trial, record, store, weights: bool = True) -> None:
    """A finished run's summary as user attrs, and its checkpoint (unless not `weights`),
    per-user ranks and full record as artifacts, so that tables never need retraining."""
    from harness.runs import save_record

    res = record.result
    for key, value in {"valid": res["valid"], "test": res["test"], "epochs": res["epochs_run"],
                       "best_epoch": res["best_epoch"], "stopped": res["stopped"], "data_hash": record.data_hash,
                       "git_commit": record.environment["git_commit"], "seconds": round(record.seconds, 1),
                       "model_config": record.model_config, "train_config": record.train_config,
                       "lid_key": (record.lid or {}).get("key"),
                       # what the run trained itself (epochs' own seconds, resumed parts included),
                       # and the pre-trained model it started from (shared by every run with its key)
                       "train_seconds": round(sum(c.get("train_seconds", 0.0) + c.get("eval_seconds", 0.0)
                                                  for c in res.get("curves", [])), 1),
                       "pretrain": {k: (record.lid or record.stage1 or {}).get(k)
                                    for k in ("key", "epochs_run", "seconds", "cached")}
                       if (record.lid or record.stage1) else None}.items():
        trial.set_user_attr(key, value)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_record(record, Path(tmp))
            kept = ((".pt", "checkpoint"),) if weights and record.state is not None else ()
            for suffix, name in (*kept, (".npz", "ranks"), (".json", "record")):
                faults.point("artifact")
                with quiet_experimental():
                    artifact_id = optuna.artifacts.upload_artifact(
                        artifact_store=store, file_path=str(path.with_suffix(suffix)), study_or_trial=trial)
                trial.set_user_attr(f"artifact_{name}", artifact_id)
    except OSError as e:
        where = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise HarnessError(f"cannot store the run's artifacts in {e.filename or 'the artifact store'} "
                           f"({where})") from None
