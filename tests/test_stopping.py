"""Runs that stop cleanly and continue (harness/stopping.py): --stop-after and SIGTERM stop a
tune, a paper run, an experiment cell and LARES's two stages after the epoch in flight (exit
75), and the same command continues, here or from a copy of the run folder, to the very
numbers an uninterrupted run gives.

The moments are drawn from a seeded RNG: a SIGTERM at the N-th saved checkpoint (the fault
point `checkpoint`, any resumable run's, pre-training included), or a deadline that passes
after the N-th look at the clock. Everything runs in-process through the CLI (one torch thread)
on the tiny synthetic set; the SLURM recipe runs as a real batch script with a fake scontrol."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from harness import faults, stopping
from harness.cli import cli
from harness.store import open_storage

STUDY = """
model = "sasrec"
trials = 4
pruner = { name = "hyperband", min_resource = 1, reduction_factor = 2 }
[fixed]
hidden = 16
inner = 32
[space]
layers = { type = "int", low = 1, high = 2 }
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
"""
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str, fault: str | None = None, monkeypatch=None):
    """One CLI invocation with a fresh fault counter; `fault` sets HARNESS_FAULT for it."""
    faults._counts.clear()
    if fault:
        monkeypatch.setenv("HARNESS_FAULT", fault)
    else:
        monkeypatch.delenv("HARNESS_FAULT", raising=False)
    try:
        return CliRunner().invoke(cli, list(args), terminal_width=200)
    finally:
        monkeypatch.delenv("HARNESS_FAULT", raising=False)


def until_done(args: list[str], monkeypatch, rng: random.Random, most: int, tries: int = 40,
               between=None) -> list[int]:
    """Run `args` again and again, each time with a SIGTERM at a random checkpoint (1..most),
    until it exits 0; returns the exit codes (75 for each stop). `between(i)` runs after the
    i-th stopped invocation (e.g. to move the run folder)."""
    codes = []
    for i in range(tries):
        r = invoke(*args, fault=f"checkpoint:{rng.randint(1, most)}:term", monkeypatch=monkeypatch)
        codes.append(r.exit_code)
        if r.exit_code == 0:
            return codes
        assert r.exit_code == stopping.EXIT_STOPPED, r.output
        line = r.output.strip().splitlines()[-1]
        assert "continue with: harness " in line and "left" in line, r.output
        if between is not None:
            between(i)
    raise AssertionError(f"never finished: {codes}")


# ---- the clock and the signals ---------------------------------------------------------------

def test_durations_parse_and_refuse():
    assert stopping.parse_duration("2h30m") == 9000
    assert stopping.parse_duration("90s") == 90 and stopping.parse_duration("45m") == 2700
    assert stopping.parse_duration("1d2h") == 93600 and stopping.parse_duration("1.5h") == 5400
    assert stopping.parse_duration("120") == 120
    for bad in ("2x", "h", "2h 30m", "", "-5m"):
        with pytest.raises(ValueError):
            stopping.parse_duration(bad)
    r = CliRunner().invoke(cli, ["tune", "--dataset", "synthetic", "--stop-after", "soon"])
    assert r.exit_code == 2 and "--stop-after" in r.output and "2h30m" in r.output


def test_no_run_starts_that_cannot_finish_unless_it_is_longer_than_the_slice(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(stopping.time, "time", lambda: now[0])
    stopping.reset()
    try:
        assert stopping.room_for(1e9) and stopping.stop_due() is None  # no deadline: anything starts
        stopping.set_deadline(600)
        assert stopping.room_for(500) and stopping.room_for(None)
        now[0] += 200  # 400 s left
        assert not stopping.room_for(500)  # would end after the deadline
        assert stopping.room_for(700)  # longer than the whole slice: it could never fit one
        assert stopping.stop_due() is None
        now[0] += 401
        assert "deadline" in stopping.stop_due() and not stopping.room_for(1)
        stopping.reset()
        stopping.request_stop("SIGTERM received")
        assert stopping.stop_due() == "SIGTERM received" and not stopping.room_for(None)
    finally:
        stopping.reset()


def test_a_second_ctrl_c_aborts(monkeypatch):
    saved = signal.getsignal(signal.SIGINT)
    try:
        stopping.reset()
        stopping.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop
        assert stopping.requested() == "SIGINT received"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0)  # the handler runs between bytecodes
    finally:
        signal.signal(signal.SIGINT, saved)
        stopping.reset()


# ---- a tune --------------------------------------------------------------------------------

def _tune_args(root: Path, study: Path) -> list[str]:
    return ["--results-dir", str(root / "res"), "--cache-dir", str(root / "cache"), "tune", "--dataset", "synthetic",
            "--study", str(study), "--storage", str(root / "s.journal"), "--device", "cpu", "--precision", "fp32",
            "--epochs", "4"]


def _trials(root: Path) -> list[tuple]:
    study = optuna.load_study(study_name="sasrec-synthetic", storage=open_storage(str(root / "s.journal")))
    return [(t.number, t.state.name, t.params, t.value, t.intermediate_values, t.user_attrs.get("test"))
            for t in study.get_trials() if t.state.is_finished()]


def test_a_tune_stopped_by_signals_and_a_deadline_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    study = tmp_path / "small.toml"
    study.write_text(STUDY)
    whole = invoke(*_tune_args(tmp_path / "whole", study), monkeypatch=monkeypatch)
    assert whole.exit_code == 0, whole.output

    rng = random.Random(7)
    root = tmp_path / "stopped"
    codes = until_done(_tune_args(root, study), monkeypatch, rng, most=5)
    assert codes.count(stopping.EXIT_STOPPED) >= 2, codes

    # a deadline passing after a random number of looks at the clock, on the same study
    # continued with more trials (the uninterrupted study gets the same two trials more)
    more = ["--trials", "6"]
    assert invoke(*_tune_args(tmp_path / "whole", study), *more, monkeypatch=monkeypatch).exit_code == 0
    looks = {"n": 0, "at": rng.randint(3, 6)}
    real = stopping.seconds_left

    def clock() -> float | None:
        looks["n"] += 1
        return -1.0 if looks["n"] >= looks["at"] else 1e9

    monkeypatch.setattr(stopping, "seconds_left", clock)
    r = invoke(*_tune_args(root, study), *more, "--stop-after", "1h", monkeypatch=monkeypatch)
    assert r.exit_code == stopping.EXIT_STOPPED and "deadline passed" in r.output, r.output
    monkeypatch.setattr(stopping, "seconds_left", real)
    assert invoke(*_tune_args(root, study), *more, monkeypatch=monkeypatch).exit_code == 0

    assert _trials(root) == _trials(tmp_path / "whole")  # every trial, to the digit, pruning decisions too
    stopped = (root / "res" / "tune" / "sasrec-synthetic" / "trials.csv").read_text()
    assert stopped == (tmp_path / "whole" / "res" / "tune" / "sasrec-synthetic" / "trials.csv").read_text()
    assert not list((root / "cache" / "inflight").glob("*.pt"))  # no checkpoint outlives its run


def test_a_stopped_trial_waits_with_its_number_and_resumes_first(tmp_path, monkeypatch):
    study = tmp_path / "small.toml"
    study.write_text(STUDY)
    r = invoke(*_tune_args(tmp_path, study), fault="checkpoint:2:term", monkeypatch=monkeypatch)
    assert r.exit_code == stopping.EXIT_STOPPED, r.output
    assert "trial 0 waits at epoch 2" in r.output
    s = optuna.load_study(study_name="sasrec-synthetic", storage=open_storage(str(tmp_path / "s.journal")))
    (waiting,) = s.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting.number == 0 and waiting.user_attrs["stops"] == 1 and list(waiting.intermediate_values) == [1, 2]
    assert len(list((tmp_path / "cache" / "inflight").glob("*.pt"))) == 1
    r = invoke(*_tune_args(tmp_path, study), "--trials", "1", monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    (done,) = [t for t in s.get_trials() if t.state.is_finished()]
    assert done.number == 0 and list(done.intermediate_values) == [1, 2, 3, 4] and done.user_attrs["epochs"] == 4


# ---- an experiment cell and LARES's two stages ------------------------------------------------

def test_an_experiment_cell_stopped_mid_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    def args(root: Path) -> list[str]:
        return ["--results-dir", str(root / "res"), "--cache-dir", str(root / "cache"), "compare", "--dataset",
                "synthetic", "--models", "sasrec", "--seeds", "1", "--params", "paper", "--epochs", "4",
                "--device", "cpu", "--precision", "fp32", "--storage", str(root / "s.journal")]

    assert invoke(*args(tmp_path / "whole"), monkeypatch=monkeypatch).exit_code == 0
    r = invoke(*args(tmp_path / "stopped"), fault="checkpoint:2:term", monkeypatch=monkeypatch)
    assert r.exit_code == stopping.EXIT_STOPPED and "0 / 1 cells done" in r.output, r.output
    assert invoke(*args(tmp_path / "stopped"), monkeypatch=monkeypatch).exit_code == 0

    def cell(root: Path):
        study = optuna.load_study(study_name="compare-synthetic", storage=open_storage(str(root / "s.journal")))
        (t,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        return t.value, t.user_attrs["test"], t.user_attrs["epochs"], t.user_attrs["best_epoch"]

    assert cell(tmp_path / "stopped") == cell(tmp_path / "whole")


def test_lares_stopped_in_both_stages_ends_bit_identical(tmp_path, monkeypatch):
    def args(root: Path) -> list[str]:
        return ["--results-dir", str(root / "res"), "--cache-dir", str(root / "cache"), "train", "--model", "lares",
                "--dataset", "synthetic", "--epochs", "3", "--lid-epochs", "3", "--device", "cpu",
                "--precision", "fp32", "--param", "hidden=16", "--param", "inner=32"]

    assert invoke(*args(tmp_path / "whole"), monkeypatch=monkeypatch).exit_code == 0
    root = tmp_path / "stopped"
    # the 2nd checkpoint is stage 1's (pre-training), the 5th stage 2's: both stop and continue
    for n in (2, 2):
        r = invoke(*args(root), fault=f"checkpoint:{n}:term", monkeypatch=monkeypatch)
        assert r.exit_code == stopping.EXIT_STOPPED, r.output
    assert invoke(*args(root), monkeypatch=monkeypatch).exit_code == 0

    def result(root: Path):
        (record,) = (root / "res" / "runs").glob("*.json")
        ranks = np.load(record.with_suffix(".npz"))
        data = json.loads(record.read_text())
        return data["result"]["test"], data["stage1"]["valid"], ranks["test_ranks"], ranks["valid_ranks"]

    whole, stopped = result(tmp_path / "whole"), result(root)
    assert whole[:2] == stopped[:2]
    assert np.array_equal(whole[2], stopped[2]) and np.array_equal(whole[3], stopped[3])


# ---- a paper run in a run folder, moved between stops ---------------------------------------

def _paper_args(run_dir: Path, cache: Path) -> list[str]:
    return ["--cache-dir", str(cache), "paper", "--dataset", "synthetic", "--models", "sasrec,mostpop",
            "--stages", "tune,select,compare,report", "--trials", "2", "--epochs", "3", "--min-epochs", "1",
            "--seeds", "2", "--final-epochs", "3", "--no-bench", "--device", "cpu", "--precision", "fp32",
            "--run-dir", str(run_dir)]


def test_a_paper_run_folder_stopped_copied_elsewhere_and_resumed_gives_the_same_tables(tmp_path, monkeypatch):
    whole = invoke(*_paper_args(tmp_path / "whole", tmp_path / "cache-a"), monkeypatch=monkeypatch)
    assert whole.exit_code == 0, whole.output
    where = {"dir": tmp_path / "first"}

    def move(i: int) -> None:  # after the first stop, the folder goes to "another machine"
        if i == 0:
            shutil.copytree(where["dir"], tmp_path / "second")
            shutil.rmtree(where["dir"])
            where["dir"] = tmp_path / "second"

    rng = random.Random(3)
    codes = []
    for _ in range(30):
        r = invoke(*_paper_args(where["dir"], tmp_path / f"cache-{len(codes)}"),
                   fault=f"checkpoint:{rng.randint(1, 6)}:term", monkeypatch=monkeypatch)
        codes.append(r.exit_code)
        if r.exit_code == 0:
            break
        assert r.exit_code == stopping.EXIT_STOPPED and "paper stopped in stage" in r.output, r.output
        move(len(codes) - 1)
    assert codes[-1] == 0 and codes.count(stopping.EXIT_STOPPED) >= 2, codes

    ours, theirs = where["dir"] / "report", tmp_path / "whole" / "report"
    for name in ("paper-compare-synthetic.csv", "tuning_curve.csv"):
        assert (ours / name).read_text() == (theirs / name).read_text(), name
    tuning = [pd.read_csv(d / "tuning.csv").drop(columns=["stopped_and_resumed"]) for d in (ours, theirs)]
    pd.testing.assert_frame_equal(*tuning)
    manifest = json.loads((ours / "manifest.json").read_text())
    assert manifest["seeds"]["tuning"] not in manifest["seeds"]["final"]
    assert set(manifest["selection"]["models"]) == {"sasrec"} and manifest["untuned"] == ["mostpop"]
    # the folder holds what it needs and nothing it does not
    assert (where["dir"] / "optuna.journal").is_file()
    assert not list((where["dir"] / "inflight").glob("*.pt"))
    assert not list(where["dir"].rglob("*.pt")) or all("pretrained" in str(p) for p in where["dir"].rglob("*.pt"))


# ---- the SLURM recipe ------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="the batch script is bash with Linux signals")
def test_the_sbatch_recipe_requeues_on_usr1(tmp_path):
    """scripts/slurm/harness-paper.sbatch as SLURM runs it: the batch shell gets USR1 before the
    time limit (--signal=B:USR1@600), passes it to harness, and requeues the job on exit 75."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    study = tmp_path / "small.toml"
    study.write_text(STUDY)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "HARNESS": f"{sys.executable} -m harness", "OMP_NUM_THREADS": "1", "HARNESS_AUTO_FETCH": "0"}
    job = subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / "harness-paper.sbatch"),
                            *_tune_args(tmp_path, study)[:-2], "--epochs", "50"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    inflight = tmp_path / "cache" / "inflight"
    deadline = time.monotonic() + 300
    while not list(inflight.glob("*.pt")):  # the first epoch's checkpoint: harness is training
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == stopping.EXIT_STOPPED, out
    assert "SIGUSR1" in out and "continue with: harness" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
