"""`harness tune`, `harness studies`, `harness dashboard`: create or resume a study, run its
trials in this process or in N worker processes, fail and retry the trials of dead workers,
and summarise (best trial, counts, epochs saved by pruning, top trials as CSV and LaTeX,
parameter importances) under results/tune/<study>/.

Resume: a study is named `<model>-<dataset>` unless --study-name; running again continues it
(the target counts COMPLETE + PRUNED trials already stored). Its definition (model, dataset,
fixed params, search space) is stored with it, and a study file that no longer matches is
refused unless --new-study, which starts `<name>-2` beside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness import faults, stopping
from harness.errors import HarnessError, first_line
from harness.stopping import RunStopped
from harness.store import (DEFAULT_STORAGE, artifact_store, check_writable, heartbeat, one_line_thread_errors, open_storage,
                           pending_retries, quiet_experimental, recover, require_existing, safe_url,
                           unlabelled_grace, unlabelled_running)
from harness.runs import TRAINER_KEYS, train_identity
from harness.studies import SearchParam, TuneJob, budget_trials, make_objective, make_pruner, make_sampler

MAX_FAILURES_IN_A_ROW = 5  # a worker stops when this many trials in a row fail (a broken setup)
MAX_STORAGE_ERRORS_IN_A_ROW = 8  # a worker stops when its storage keeps failing (a database down for good)
MIN_TRIALS_FOR_IMPORTANCE = 10  # PED-ANOVA compares the top 10 % with the rest
TOP_N = 10
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# ---------------------------------------------------------------------------------------------
# Create or resume a study; dead workers
# ---------------------------------------------------------------------------------------------

def study_definition(job: TuneJob) -> dict:
    """What makes trials comparable; stored with the study, compared on resume. The trainer
    settings count too (a 50-epoch trial is no peer of a 200-epoch one, and --mask-history
    changes the metric), except the device and those the study file sets itself."""
    sf = job.study_file
    set_by_file = {*sf.fixed, *(p.name for p in sf.space)}
    train = train_identity(job.base.train, drop=tuple(set_by_file))
    return {"model": sf.model, "dataset": job.dataset, "metric": sf.metric, "direction": sf.direction,
            "fixed": {k: sf.fixed[k] for k in sorted(sf.fixed)},
            "space": {p.name: p.describe() for p in sf.space},
            "train": {**train, "lid_epochs": job.base.lid_epochs}}


def open_study(job: TuneJob, storage) -> tuple[optuna.Study, str]:
    """Create the study, or resume it when its definition matches; returns it and a note."""
    name = job.study_name or job.default_study_name()
    names = set(optuna.study.get_all_study_names(storage))
    definition = json.loads(json.dumps(study_definition(job)))
    where = safe_url(job.storage_url)
    kept = ""
    if name in names and job.new_study:
        base, n = name, 2
        while f"{base}-{n}" in names:
            n += 1
        name, kept = f"{base}-{n}", f" (study {name!r} is kept as it was)"
    # an existing study is loaded, not created again (on a journal, create_study(load_if_exists)
    # appends a "create study" record even when it loads), and its definition is compared before
    # anything is written: a refused resume leaves the storage as it was
    if name in names:
        study = optuna.load_study(study_name=name, storage=storage)
    else:  # load_if_exists: another worker may create it first
        study = optuna.create_study(study_name=name, storage=storage, direction=job.study_file.direction,
                                    load_if_exists=True)
    stored = study.user_attrs.get("definition")
    if stored is not None and stored != definition:
        raise HarnessError(f"study {name!r} in {where} was created with a different definition "
                           f"({_first_difference(stored, definition, job.study_file.path)}); "
                           "rerun with --new-study to start a fresh study beside it (the old one is kept), "
                           "or pick another --study-name")
    if not study.metric_names:
        with quiet_experimental():  # the dashboard labels its axes "valid_ndcg@10", not "Objective 0"
            study.set_metric_names([job.study_file.metric])
    if stored is None:
        study.set_user_attr("definition", definition)
        study.set_user_attr("study_file", str(job.study_file.path))
        for params in job.study_file.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        return study, f"created study {name!r} in {where}{kept}"
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    return study, f"resuming study {name!r} in {where}: " + (
        ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials yet")


def _first_difference(stored: dict, now: dict, path: Path) -> str:
    for key in ("model", "dataset", "metric", "direction"):
        if stored.get(key) != now[key]:
            return f"{key}: {stored.get(key)!r} stored, {now[key]!r} now"
    for section in ("space", "fixed", "train"):
        old, new = stored.get(section, {}), now[section]
        for key in [*old, *(k for k in new if k not in old)]:
            if old.get(key) != new.get(key):
                where = f"in {path}" if section != "train" else "now"
                return f"{section}.{key}: {old.get(key, 'absent')} stored, {new.get(key, 'absent')} {where}"
    return "parameter order"


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

class _TrialPrinter:
    """One line per finished trial; stops the worker after repeated failures (a broken setup)."""

    def __init__(self, echo: Callable[[str], None], prefix: str):
        self.echo, self.prefix, self.failures_in_a_row = echo, prefix, 0
        self.gave_up: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.echo(self.prefix + trial_line(trial))
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            self.gave_up = f"{self.failures_in_a_row} trials in a row failed, the last with {fail_reason(trial)!r}"
            study.stop()


def trial_line(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    if "retry_of" in attrs:
        params += f" (retry of trial {attrs['retry_of']})"
    if trial.state == TrialState.COMPLETE:
        return (f"trial {trial.number} complete: valid ndcg@10 {trial.value:.4f}, test ndcg@10 "
                f"{attrs.get('test', {}).get('ndcg@10', float('nan')):.4f} ({_epochs(attrs.get('epochs'))}, "
                f"best {attrs.get('best_epoch')}); {params}")
    if trial.state == TrialState.PRUNED:
        return f"trial {trial.number} {attrs.get('prune_reason', 'pruned')}; {params}"
    state = "failed" if trial.state == TrialState.FAIL else trial.state.name.lower()
    return f"trial {trial.number} {state}: {fail_reason(trial)}"


def _epochs(n: Any) -> str:
    return plural(n, "epoch") if isinstance(n, int) else f"{n} epochs"


def fail_reason(trial: FrozenTrial) -> str:
    # RDB storages fail a stale trial without a word: its worker was killed or lost its connection
    return trial.user_attrs.get("fail_reason", "no reason recorded (worker lost: no heartbeat, or killed)")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_worker(job: TuneJob, study_name: str, worker: int = 0, storage=None,
               echo: Callable[[str], None] = print, retries_only: bool = False, progress=None) -> str | None:
    """Run trials in this process until the study has `job.target` finished trials and no
    retry of a dead worker's trial waits (or the timeout passes); returns why it stopped
    early when that is a problem. Before each trial it fails and re-enqueues the trials of
    dead siblings, so the last worker standing runs their retries instead of leaving them
    WAITING. With `retries_only` it runs just the waiting retries (the parent, after its
    workers exit). `progress` (harness.progress; None: silent) shows the study's trials i/N,
    each trial's epochs and pre-training."""
    from harness.progress import resolve

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial_line reports each trial once
    storage = storage or open_storage(job.storage_url, job.heartbeat)
    cap = job.base.train.epochs
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=make_sampler(job.study_file, worker, cap, job.base.train.seed),
                              pruner=make_pruner(job.study_file, job.pruner, cap, job.min_epochs))
    prefix = f"[w{worker}] " if worker else ""
    progress = resolve(progress).view(prefix=prefix)
    objective = make_objective(job, artifact_store(job.results_dir), progress)
    printer = _TrialPrinter(echo, prefix)
    trials = None  # the bar of the study's trials, open while this worker runs one
    deadline = None if job.timeout is None else time.monotonic() + job.timeout
    lost = 0  # storage calls failed in a row (a database restart, a network cut)
    waiting_said = False
    try:
        while printer.gave_up is None:
            try:
                for number in recover(study):
                    echo(f"{prefix}trial {number}: its worker died; failed and enqueued again")
                retries = pending_retries(study)
                if not retries and (retries_only or finished_count(study) >= job.target):
                    if retries_only and (unlabelled := unlabelled_running(study)):
                        # nobody may be left to notice these (see unlabelled_running): wait until
                        # each is labelled by a live worker elsewhere or old enough to fail and retry
                        if not waiting_said:
                            echo(f"{prefix}waiting on trial(s) {', '.join(str(t.number) for t in unlabelled)}: running "
                                 f"with no worker recorded (a storage failure?); failed and retried after "
                                 f"{unlabelled_grace(storage):.0f} s without one")
                            waiting_said = True
                        time.sleep(1)
                        continue
                    break
                if deadline is not None and time.monotonic() >= deadline and not retries:
                    break  # --timeout starts no new trial, but a dead worker's retry is still owed
                if not stopping.room_for(next_trial_seconds(study, job)):
                    due = stopping.stop_due()
                    raise (RunStopped(due) if due else
                           stopping.NoRoom("the next trial would not finish before the --stop-after deadline"))
                if trials is None:
                    trials = progress.start(job.target, finished_count(study), label="trials", unit="trial",
                                            lines=False)
                run_one_trial(study, objective, printer)
                trials.update(finished_count(study))
                lost = 0
            except RunStopped:
                raise
            except Exception as e:
                # The objective's own errors are caught by optimize (catch=...); what escapes is the
                # storage failing under Optuna's bookkeeping (a lost database connection, and what
                # Optuna raises after it: "Cannot tell a FAIL trial" once the silent trial was
                # failed by its heartbeat). The trial in flight is left to its heartbeat: whoever
                # looks next, this worker once the server is back or another, fails and retries it.
                lost += 1
                reason = f"{type(e).__name__}: {first_line(e)}"
                if lost >= MAX_STORAGE_ERRORS_IN_A_ROW:
                    return f"the storage kept failing ({reason})"
                echo(f"{prefix}warning: storage call failed ({reason}); retrying")
                time.sleep(min(job.heartbeat, 5) * lost)
    finally:
        if trials is not None:
            trials.finish()
    return printer.gave_up


def run_one_trial(study: optuna.Study, objective: Callable[[optuna.Trial], float],
                  printer: Callable[[optuna.Study, FrozenTrial], None]) -> None:
    """Ask a trial (a suspended or enqueued one first), run it, tell its state: what
    `study.optimize(n_trials=1)` does, except that a trial stopped by a deadline or a signal is
    left WAITING for its resume (`studies.suspend`) instead of being told FAIL."""
    with quiet_experimental():
        trial = study.ask()
    value, state = None, TrialState.FAIL
    with heartbeat(study, trial):
        try:
            value, state = objective(trial), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except RunStopped:
            raise
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception:
            pass  # the objective recorded why (fail_reason)
    printer(study, study.tell(trial, value, state=state))


def next_trial_seconds(study: optuna.Study, job: TuneJob) -> float | None:
    """What the next trial may take, for --stop-after: the epochs it has left (a suspended
    trial resumes) times the seconds per epoch this study's trials took (else the job's cost
    model; else unknown)."""
    per_epoch = [t.user_attrs["seconds"] / t.user_attrs["epochs"] for t in study.get_trials(deepcopy=False, states=FINISHED)
                 if t.user_attrs.get("seconds") and t.user_attrs.get("epochs") and not t.user_attrs.get("stops")]
    seconds = sorted(per_epoch)[len(per_epoch) // 2] if per_epoch else job.epoch_seconds
    if seconds is None:
        return None
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    done = int(waiting[0].user_attrs.get("epochs", 0)) if waiting else 0
    return max(job.base.train.epochs - done, 1) * seconds


def plan_line(study: optuna.Study, job: TuneJob, interactions: int) -> str:
    """What is about to run and how long it may take, before the first trial: trials left, the
    epoch cap, and an ETA from this study's own trials, else the job's cost model, else the
    rough 1-thread CPU figures `harness paper` plans with (scaled by the data's size)."""
    from harness.paper_plan import ROUGH_EVAL_SECONDS, ROUGH_SECONDS_PER_EPOCH, TOYS_INTERACTIONS, format_duration

    left = job.target - finished_count(study)
    cap, model = job.base.train.epochs, job.study_file.model
    per_trial = next_trial_seconds(study, job)
    source = "this study's trials so far" if per_trial is not None else ""
    if per_trial is None:
        rough = ROUGH_SECONDS_PER_EPOCH.get(model, max(ROUGH_SECONDS_PER_EPOCH.values()))
        per_trial = cap * (rough + ROUGH_EVAL_SECONDS) * interactions / TOYS_INTERACTIONS
        source = "rough 1-thread CPU figures; 2 threads or a GPU are faster"
    extra = ("; the first trials also pre-train the LID encoders they need (cached)"
             if model.startswith("igr-sr") else "")
    return (f"plan: {plural(left, 'trial')} of {model} on {job.dataset}, each at most {plural(cap, 'epoch')} "
            f"({job.pruner_name} pruning), on {plural(job.workers, 'worker')}: ETA <= "
            f"{format_duration(left * per_trial / max(job.workers, 1))} if nothing is pruned ({source}){extra}")


def stopped_line(study: optuna.Study, job: TuneJob, why: str) -> str:
    """The one line a stopped tune prints: trials done / target, what is left, the ETA."""
    from harness.paper_plan import format_duration

    done = finished_count(study)
    left = max(job.target - done, 0)
    suspended = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if t.user_attrs.get("suspended")]
    per_trial = next_trial_seconds(study, job) if left else 0
    held = "".join(f"; trial {t.number} waits at epoch {t.user_attrs.get('epochs', 0)}" for t in suspended)
    eta = "unknown" if per_trial is None else format_duration(left * per_trial / max(job.workers, 1))
    return (f"study {study.study_name!r} stopped ({first_line(why)}): {done} / {plural(job.target, 'trial')} finished, "
            f"{left} left{held}; ETA {eta}")


def finished_count(study: optuna.Study) -> int:
    """Trials toward the target: complete, pruned, and failed ones not run again (budget_trials)."""
    return len(budget_trials(study))


def threads_per_worker(workers: int) -> int:
    """The cores split between workers; an OMP_NUM_THREADS already set is a cap."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def _gpus(job: TuneJob) -> list[str]:
    """GPU ids to hand out one per worker, when the device allows more than one."""
    if job.base.train.device not in ("auto", "cuda"):
        return []
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [] if count < 2 else (visible.split(",") if visible else [str(i) for i in range(count)])


def _die_with_parent() -> None:
    """In a worker, just before exec: ask the kernel for SIGKILL when the parent dies, so a
    killed `harness tune` leaves no orphan workers training on; its rerun fails their trials
    (their pids are gone) and retries them. Linux only; elsewhere orphans finish their trial."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker_processes(job: TuneJob, argv_for: Callable[[int], list[str]],
                         echo: Callable[[str], None] = print) -> list[str]:
    """Start `job.workers` worker processes (the same command with --worker I), wait for them;
    returns a line per worker that did not exit cleanly."""
    threads, gpus = threads_per_worker(job.workers), _gpus(job)
    processes = []
    for i in range(1, job.workers + 1):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "HARNESS_WORKER": str(i)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[(i - 1) % len(gpus)]
        processes.append(subprocess.Popen(argv_for(i), env=env,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None))
    echo(f"started {job.workers} workers ({threads} torch thread{'s' * (threads > 1)} each): pids "
         + ", ".join(str(p.pid) for p in processes))
    faults.point("workers")
    problems = []
    try:
        forwarded = False
        while any(p.poll() is None for p in processes):
            if stopping.requested() and not forwarded:
                # a signal sent to this process alone (SLURM's, a `kill`): each worker stops after
                # its epoch in flight, its trial or cell kept for the resume
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGUSR1)
                forwarded = True
            try:
                processes[[p.poll() is None for p in processes].index(True)].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        for i, process in enumerate(processes, 1):
            code = process.returncode
            if code == stopping.EXIT_STOPPED:
                problems.append(f"worker {i} (pid {process.pid}) stopped (deadline or signal); its work resumes")
            elif code:
                what = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                problems.append(f"worker {i} (pid {process.pid}) {what}")
    except KeyboardInterrupt:
        # a second Ctrl-C (the first asks for a stop): abort, each worker marks its trial
        # interrupted and enqueues it again
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
        raise
    return problems


def _check_runnable(job: TuneJob) -> None:
    """Refuse, before the first trial, settings that would fail every trial."""
    from harness.train import resolve_device

    resolve_device(job.base.train.device)  # --device cuda without CUDA: one line now, not 5 failed trials
    check_writable(job.results_dir)


def tune(job: TuneJob, worker_argv: Callable[[str, int], list[str]] | None = None,
         worker: int | None = None, echo: Callable[[str], None] = print, progress=None) -> TuneSummary | None:
    """`harness tune`: check, create or resume the study, run trials here or in `job.workers`
    processes (`worker_argv(study_name, i)` is worker i's command line), then run whatever
    retries of dead workers' trials remain, and summarise. A worker process (`worker` set)
    only runs trials. `progress` (harness.progress; None: silent) shows the trials this
    process runs."""
    from harness.data import registry as datasets

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created": we say it
    clash = sorted(job.given_flags & {k for k in TRAINER_KEYS if k in job.study_file.fixed
                                      or any(p.name == k for p in job.study_file.space)})
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        raise HarnessError(f"{flag}: {job.study_file.path} sets {clash[0]} for every trial; drop the flag "
                           "or edit the study file")
    _check_runnable(job)
    one_line_thread_errors(echo)
    data = datasets.load(job.dataset, job.base.data_dir, job.base.cache_dir)  # a missing dataset: one line, now
    if worker is not None:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        gave_up = run_worker(job, job.study_name or job.default_study_name(), worker, echo=echo, progress=progress)
        if gave_up:
            raise HarnessError(f"worker {worker}: {gave_up}")  # exit status 1 tells the parent
        return None
    storage = open_storage(job.storage_url, job.heartbeat, echo=echo)
    study, note = open_study(job, storage)
    study.set_user_attr("target", job.target)  # `--params best` takes the best of this many (budget_trials)
    study.set_user_attr("sampler", {"name": job.study_file.sampler[0], "seed": job.sampler_seed,
                                    "seeded": "per trial: (seed, trial number)"})
    echo(note)
    for number in recover(study):
        echo(f"trial {number}: its worker died; failed and enqueued again")
    done = finished_count(study)
    if done >= job.target and not pending_retries(study):
        echo(f"the study already has {plural(done, 'finished trial')} (target {job.target}): nothing to run; "
             "raise --trials to continue it")
    if done < job.target:
        echo(plan_line(study, job, data.n_interactions))
    problems: list[str] = []
    try:
        if job.workers == 1 or done >= job.target:
            gave_up = run_worker(job, study.study_name, 0, storage, echo, progress=progress)
            problems += [gave_up] if gave_up else []
        else:
            problems = run_worker_processes(job, lambda i: worker_argv(study.study_name, i), echo)
            if stopping.stop_due() or any("stopped" in p for p in problems):
                raise RunStopped(stopping.stop_due() or "a worker stopped")
        if not problems or job.workers > 1:
            # a worker killed last leaves its trial RUNNING (or its retry WAITING) with nobody left
            # to notice, and a storage failure can leave a trial with no worker at all: settle those
            # here, so the study is never summarised with a trial stranded or a retry owed
            gave_up = run_worker(job, study.study_name, 0, storage, echo, retries_only=True, progress=progress)
            problems += [gave_up] if gave_up else []
    except RunStopped as e:
        raise type(e)(stopped_line(study, job, str(e))) from None
    try:
        return summarize(study, job, problems)
    except OSError as e:  # the study itself is stored; only its files could not be written
        raise HarnessError(f"--results-dir {job.results_dir}: cannot write the study's summary "
                           f"({e.strerror or e}); the trials are stored, rerun to write it") from None


# ---------------------------------------------------------------------------------------------
# Summary: best trial, counts, epochs saved by pruning, top trials, importances
# ---------------------------------------------------------------------------------------------

@dataclass
class TuneSummary:
    study_name: str
    storage: str
    target: int
    counts: dict[str, int]
    best: dict | None  # number, value, params, test
    epochs_trained: int
    epochs_unpruned: int
    importances: dict[str, float]
    importance_note: str
    outputs: dict[str, Path]
    problems: list[str]

    @property
    def finished(self) -> int:
        return self.counts.get("complete", 0) + self.counts.get("pruned", 0)


def trial_row(trial: FrozenTrial, space: tuple[SearchParam, ...]) -> dict:
    attrs = trial.user_attrs
    row = {"trial": trial.number, "state": trial.state.name.lower(),
           "valid_ndcg@10": trial.value if trial.state == TrialState.COMPLETE else None}
    for name in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        row[f"test_{name}"] = attrs.get("test", {}).get(name)
    row.update({"epochs": attrs.get("epochs"), "best_epoch": attrs.get("best_epoch"),
                "epoch_cap": attrs.get("epoch_cap")})
    row.update({p.name: trial.params.get(p.name) for p in space})
    row["note"] = (attrs.get("prune_reason", "") if trial.state == TrialState.PRUNED
                   else fail_reason(trial) if trial.state == TrialState.FAIL else "")
    return row


def summarize(study: optuna.Study, job: TuneJob, problems: list[str]) -> TuneSummary:
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    counts = Counter(t.state.name.lower() for t in trials)
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "test": b.user_attrs.get("test", {}),
                "epochs": b.user_attrs.get("epochs"), "best_epoch": b.user_attrs.get("best_epoch")}
    epochs_trained = sum(t.user_attrs.get("epochs", 0) for t in complete + pruned)
    epochs_unpruned = (sum(t.user_attrs.get("epochs", 0) for t in complete)
                       + sum(t.user_attrs.get("epoch_cap", 0) for t in pruned))
    importances, note = {}, ""
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        note = (f"parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials "
                f"({len(complete)} so far)")
    else:
        try:
            with quiet_experimental():
                importances = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as e:  # e.g. a parameter with one value only
            note = f"parameter importances unavailable: {first_line(e)}"

    out = job.results_dir / "tune" / study.study_name.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    space = job.study_file.space
    rows = pd.DataFrame([trial_row(t, space) for t in trials])
    top = sorted(complete, key=lambda t: t.value, reverse=True)[:TOP_N]
    top_rows = pd.DataFrame([trial_row(t, space) for t in top])
    outputs = {"trials": out / "trials.csv", "top_csv": out / "top_trials.csv", "top_tex": out / "top_trials.tex",
               "summary": out / "summary.json"}
    rows.to_csv(outputs["trials"], index=False)
    faults.point("summary")
    top_rows.to_csv(outputs["top_csv"], index=False)
    outputs["top_tex"].write_text(latex_top_trials(top, job, study.study_name))
    if importances:
        outputs["importances"] = out / "importances.csv"
        pd.Series(importances, name="importance").rename_axis("parameter").to_csv(outputs["importances"])
    summary = TuneSummary(study_name=study.study_name, storage=safe_url(job.storage_url), target=job.target,
                          counts=dict(counts), best=best, epochs_trained=epochs_trained,
                          epochs_unpruned=epochs_unpruned, importances=importances, importance_note=note,
                          outputs=outputs, problems=problems)
    outputs["summary"].write_text(json.dumps(
        {**dataclasses.asdict(summary), "outputs": {k: str(v) for k, v in outputs.items()}}, indent=2) + "\n")
    return summary


def latex_top_trials(top: list[FrozenTrial], job: TuneJob, study_name: str) -> str:
    """Booktabs table of the top trials (rows: trial and its parameters), metrics marked per
    column and captioned like the experiments' tables."""
    import pandas as pd

    from harness.tables import Table, latex_escape, protocol_caption

    space = [p.name for p in job.study_file.space]
    metrics = {"valid NDCG@10": lambda t: t.value}
    for name in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        label = f"test {name.replace('recall', 'Recall').replace('ndcg', 'NDCG')}"
        metrics[label] = lambda t, name=name: t.user_attrs.get("test", {}).get(name)
    index = pd.MultiIndex.from_tuples([(str(t.number), *(_fmt(t.params[p]) if p in t.params else "--" for p in space))
                                       for t in top], names=["trial", *space])
    frame = pd.DataFrame({label: [get(t) for t in top] for label, get in metrics.items()}, index=index, dtype=float)
    caption = (rf"Top trials of study {latex_escape(study_name)} ({latex_escape(job.study_file.model)} on "
               rf"{latex_escape(job.dataset)}) by validation NDCG@10, which selects and prunes; test metrics of "
               rf"each trial's best-validation checkpoint; at most {job.base.train.epochs} epochs per trial, "
               rf"in {job.base.train.precision} (scores ranked in fp32). "
               + protocol_caption(mask_history=job.base.train.mask_history, max_len=job.base.train.max_len,
                                  stars=False))
    label = f"tab:tune-{re.sub(r'[^A-Za-z0-9:-]', '-', study_name)}"
    return Table(mean=frame, caption=caption, label=label, highlight="column").to_latex()


def format_summary(s: TuneSummary):
    """The summary as rich renderables."""
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = []
    counts = ", ".join(f"{s.counts.get(k, 0)} {word}" for k, word in
                       (("complete", "complete"), ("pruned", "pruned"), ("fail", "failed")))
    others = ", ".join(f"{n} {k}" for k, n in s.counts.items() if k not in ("complete", "pruned", "fail"))
    parts.append(f"study [bold]{s.study_name}[/bold] in {s.storage}: {counts}" + (f", {others}" if others else "")
                 + f" (target {s.target} complete + pruned)")
    if s.best is None:
        parts.append("no completed trial yet")
    else:
        parts.append(f"best trial {s.best['number']}: valid ndcg@10 [bold]{s.best['value']:.4f}[/bold]")
        table = Table()
        table.add_column("parameter")
        table.add_column("value", justify="right")
        for key, value in s.best["params"].items():
            table.add_row(key, _fmt(value))
        for key, value in s.best["test"].items():
            table.add_row(f"test {key}", f"{value:.4f}")
        parts.append(table)
    if s.epochs_unpruned:
        saved = 1 - s.epochs_trained / s.epochs_unpruned
        parts.append(f"epochs trained {s.epochs_trained} of {s.epochs_unpruned} unpruned ({saved:.0%} saved by pruning)")
    if s.importances:
        table = Table(title="parameter importances (PED-ANOVA)")
        table.add_column("parameter")
        table.add_column("importance", justify="right")
        for key, value in s.importances.items():
            table.add_row(key, f"{value:.3f}")
        parts.append(table)
    elif s.importance_note:
        parts.append(f"note: {s.importance_note}")
    parts.extend(f"[yellow]warning: {p}[/yellow]" for p in s.problems)
    parts.append(f"outputs in {s.outputs['summary'].parent}/")
    return Group(*parts)


# ---------------------------------------------------------------------------------------------
# `harness studies`, `harness dashboard`
# ---------------------------------------------------------------------------------------------

def list_studies(url: str | None) -> list[dict]:
    journal = url or DEFAULT_STORAGE
    if url is None and not Path(journal).exists():
        return []  # nothing stored yet: do not create the file just to say so
    require_existing(url)  # a mistyped --storage: one line, nothing created
    storage = open_storage(url)
    rows = []
    for name in sorted(optuna.study.get_all_study_names(storage)):
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name.lower() for t in trials)
        experiment = study.user_attrs.get("experiment")
        if isinstance(experiment, dict):  # a grid of cells (models x seeds...): no best across them
            cells = [json.loads(k) for k in experiment.get("cells", [])]
            datasets = sorted({c.get("dataset", "?") for c in cells}) or ["?"]
            rows.append({"study": name, "kind": experiment.get("kind", "?"), "dataset": ", ".join(datasets),
                         "cells": len(set(experiment.get("cells", []))), **counts, "best": None, "best_trial": None})
            continue
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value) if complete else None
        definition = study.user_attrs.get("definition", {})
        rows.append({"study": name, "model": definition.get("model", "?"), "dataset": definition.get("dataset", "?"),
                     **counts, "best": None if best is None else best.value,
                     "best_trial": None if best is None else best.number})
    return rows


def format_studies(rows: list[dict], url: str | None):
    from rich import box
    from rich.table import Table

    if not rows:
        return f"no studies in {safe_url(url)} yet (run `harness tune --dataset NAME`)"
    table = Table(title=f"studies in {safe_url(url)}", box=box.SIMPLE_HEAD)
    table.add_column("study")
    table.add_column("trials")
    table.add_column("best valid NDCG@10", no_wrap=True)
    for r in rows:
        counts = [f"{r.get(k, 0)} {word}" for k, word in (("complete", "complete"), ("pruned", "pruned"),
                                                             ("fail", "failed"))]
        counts += [f"{r[k]} {k}" for k in ("running", "waiting") if r.get(k)]
        if "kind" in r:  # an experiment's grid: each cell is its own run, none is "the best"
            what = f"{r['kind']} on {r['dataset']}, {plural(r['cells'], 'cell')}"
            best = "-- (experiment grid)"
        else:
            what = f"{r['model']} on {r['dataset']}"
            best = "--" if r["best"] is None else f"{r['best']:.4f} (trial {r['best_trial']})"
        table.add_row(f"{r['study']}\n[dim]{what}[/dim]", ", ".join(counts), best)
    return table


def plural(n: int, word: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def serve_dashboard(url: str | None, host: str, port: int, results_dir: Path,
                    echo: Callable[[str], None] = print) -> None:
    """optuna-dashboard on the same storage and artifact store `harness tune` writes to. A
    journal path that does not exist is refused (a typo would otherwise serve an empty one)."""
    from optuna_dashboard import run_server

    require_existing(url)
    storage = open_storage(url)
    store = artifact_store(results_dir)
    echo(f"optuna-dashboard: http://{host}:{port}/dashboard/  (storage {safe_url(url)}, "
         f"artifacts {results_dir / 'artifacts'}; Ctrl-C to stop)")
    try:
        run_server(storage, host=host, port=port, artifact_store=store)
    except OSError as e:
        raise HarnessError(f"--host {host} --port {port}: cannot serve there ({e.strerror or e})") from None
