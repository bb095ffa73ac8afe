"""`harness tune / studies / dashboard` end to end on the tiny synthetic set: resume, pruning,
a worker killed mid-trial, two worker processes with the dashboard reading, missing data.

Models are tiny (SASRec, hidden 16) and trials run 2-6 epochs; subprocesses get one torch
thread (the machine has two cores and other work on them)."""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner

from harness.cli import cli
from harness.store import open_storage
from harness.tune import list_studies, trial_line

COMPLETE, PRUNED, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                   optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)
SMALL = """
model = "sasrec"
trials = 3
pruner = "none"
[fixed]
hidden = 16
inner = 32
[space]
layers = { type = "int", low = 1, high = 2 }
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
"""
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HARNESS_AUTO_FETCH": "0"}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def tune_args(tmp_path: Path, study: Path, *extra: str) -> list[str]:
    return ["--results-dir", str(tmp_path / "results"), "tune", "--dataset", "synthetic", "--study", str(study),
            "--storage", str(tmp_path / "optuna.journal"), "--device", "cpu", *extra]


def load(tmp_path: Path, name: str = "sasrec-synthetic") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "optuna.journal")))


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    """GET with Accept-Encoding: gzip (optuna-dashboard's bundle route fails without it)."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return response.status, body


def test_help_lists_the_tuning_commands():
    r = invoke("--help")
    for command in ("tune", "studies", "dashboard"):
        assert f"  {command} " in r.output, command
    for command in ("tune", "studies", "dashboard"):
        r = invoke(command, "--help")
        assert r.exit_code == 0 and "Example" in r.output and f"harness {command}" in r.output, r.output
    assert "--worker " not in invoke("tune", "--help").output  # internal


def test_tune_stores_records_and_resumes(tmp_path):
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    r = invoke(*tune_args(tmp_path, study, "--epochs", "2", "--trials", "2"))
    assert r.exit_code == 0, r.output
    assert "created study 'sasrec-synthetic'" in r.output and "best trial" in r.output
    assert "2 complete, 0 pruned, 0 failed" in r.output
    out = tmp_path / "results" / "tune" / "sasrec-synthetic"
    assert f"outputs in {out}/" in r.output.replace("\n", "")
    first = load(tmp_path).trials
    assert [t.state for t in first] == [COMPLETE, COMPLETE]
    for t in first:  # the run record, compact, in user attrs
        a = t.user_attrs
        assert set(a["valid"]) == set(a["test"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
        assert a["valid"]["ndcg@10"] == t.value and a["epochs"] == a["epoch_cap"] == 2 and 1 <= a["best_epoch"] <= 2
        assert len(a["data_hash"]) == 64 and a["git_commit"] and a["model_config"]["hidden"] == 16
        assert a["train_config"]["lr"] == t.params["lr"] and a["worker"]["pid"] == os.getpid()
    # checkpoint and per-user ranks are artifacts: tables need no retraining
    store = optuna.artifacts.FileSystemArtifactStore(tmp_path / "results" / "artifacts")
    best = max(first, key=lambda t: t.value)
    ranks = tmp_path / "ranks.npz"
    optuna.artifacts.download_artifact(artifact_store=store, artifact_id=best.user_attrs["artifact_ranks"],
                                       file_path=str(ranks))
    assert np.load(ranks)["test_ranks"].shape == (300,)
    checkpoint = tmp_path / "best.pt"
    optuna.artifacts.download_artifact(artifact_store=store, artifact_id=best.user_attrs["artifact_checkpoint"],
                                       file_path=str(checkpoint))
    state = torch.load(checkpoint, weights_only=True)
    assert state["item_emb.weight"].shape[1] == 16
    # tables
    top = (out / "top_trials.csv").read_text().splitlines()
    assert top[0].startswith("trial,state,valid_ndcg@10") and len(top) == 3
    assert top[1].startswith(f"{best.number},complete,")
    tex = (out / "top_trials.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{" + f"{best.value:.4f}" + "}" in tex and "full ranking" in tex
    assert json.loads((out / "summary.json").read_text())["counts"] == {"complete": 2}

    r = invoke(*tune_args(tmp_path, study, "--epochs", "2", "--trials", "3"))
    assert r.exit_code == 0, r.output
    assert "resuming study 'sasrec-synthetic'" in r.output and "2 complete" in r.output
    again = load(tmp_path).trials
    assert len(again) == 3 and [t.value for t in again[:2]] == [t.value for t in first]
    r = invoke(*tune_args(tmp_path, study, "--epochs", "2", "--trials", "3"))
    assert r.exit_code == 0 and "nothing to run" in r.output and len(load(tmp_path).trials) == 3

    (row,) = list_studies(str(tmp_path / "optuna.journal"))
    best = max(again, key=lambda t: t.value)
    assert row == {"study": "sasrec-synthetic", "model": "sasrec", "dataset": "synthetic", "complete": 3,
                   "best": best.value, "best_trial": best.number}
    r = invoke("studies", "--storage", str(tmp_path / "optuna.journal"))
    assert r.exit_code == 0 and "sasrec-synthetic" in r.output and f"{best.value:.4f} (trial {best.number})" in r.output


def test_changed_study_file_is_refused_then_new_study(tmp_path):
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    assert invoke(*tune_args(tmp_path, study, "--epochs", "1", "--trials", "1")).exit_code == 0
    study.write_text(SMALL.replace("low = 1e-3", "low = 1e-4"))
    one_line_error(invoke(*tune_args(tmp_path, study, "--epochs", "1", "--trials", "1")),
                   "study 'sasrec-synthetic'", "different definition", "space.lr", "--new-study")
    study.write_text(SMALL)  # same file, other trainer settings: not comparable either
    one_line_error(invoke(*tune_args(tmp_path, study, "--epochs", "2", "--trials", "1")),
                   "different definition", "train.epochs: 1 stored, 2 now")
    study.write_text(SMALL.replace("low = 1e-3", "low = 1e-4"))
    r = invoke(*tune_args(tmp_path, study, "--epochs", "1", "--trials", "1", "--new-study"))
    assert r.exit_code == 0, r.output
    assert "created study 'sasrec-synthetic-2'" in r.output and "'sasrec-synthetic' is kept" in r.output
    assert len(load(tmp_path).trials) == 1 and len(load(tmp_path, "sasrec-synthetic-2").trials) == 1


def test_pruning_really_prunes(tmp_path):
    study = tmp_path / "prune.toml"
    study.write_text("""
model = "sasrec"
pruner = { name = "median", n_startup_trials = 2, n_warmup_steps = 0 }
[fixed]
hidden = 16
inner = 32
[space]
lr = { type = "float", low = 1e-6, high = 1e-2, log = true }
[[enqueue]]
lr = 1e-2
[[enqueue]]
lr = 5e-3
[[enqueue]]
lr = 1e-6
[[enqueue]]
lr = 2e-6
""")
    r = invoke(*tune_args(tmp_path, study, "--epochs", "4", "--trials", "4"))
    assert r.exit_code == 0, r.output
    trials = load(tmp_path).trials
    assert [t.params["lr"] for t in trials] == [1e-2, 5e-3, 1e-6, 2e-6]
    assert [t.state for t in trials] == [COMPLETE, COMPLETE, PRUNED, PRUNED]
    completed_epochs = min(t.user_attrs["epochs"] for t in trials[:2])
    for t in trials[2:]:
        assert t.user_attrs["epochs"] < completed_epochs == 4
        assert t.user_attrs["prune_reason"].startswith(f"pruned at epoch {t.user_attrs['epochs']} of 4 by the median")
        assert t.user_attrs["prune_reason"] in r.output
    trained = sum(t.user_attrs["epochs"] for t in trials)
    assert f"epochs trained {trained} of 16 unpruned" in r.output


def test_worker_killed_mid_trial_is_retried_on_resume(tmp_path):
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    args = tune_args(tmp_path, study, "--epochs", "6", "--trials", "3")
    log = open(tmp_path / "killed.log", "w")
    worker = subprocess.Popen(harness(*args), env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    storage, victim, deadline = open_storage(str(tmp_path / "optuna.journal")), None, time.time() + 90
    try:
        while victim is None and time.time() < deadline and worker.poll() is None:
            time.sleep(0.05)
            try:
                trials = optuna.load_study(study_name="sasrec-synthetic", storage=storage).get_trials()
            except KeyError:  # not created yet
                continue
            mid = [t for t in trials if t.state == RUNNING and t.user_attrs.get("epochs", 0) >= 1]
            if mid and any(t.state == COMPLETE for t in trials):
                victim = mid[0]
                worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert victim is not None, (tmp_path / "killed.log").read_text()
    assert victim.user_attrs["worker"]["pid"] == worker.pid
    before = {t.number: t.value for t in load(tmp_path).trials if t.state == COMPLETE}

    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert f"trial {victim.number}: its worker died; failed and enqueued again" in r.output
    trials = load(tmp_path).trials
    dead = trials[victim.number]
    assert dead.state == FAIL and dead.user_attrs["fail_reason"] == f"worker died (pid {worker.pid} on {socket.gethostname()})"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == COMPLETE and retry[0].params == victim.params
    assert f"(retry of trial {victim.number})" in trial_line(retry[0])
    assert {t.number: t.value for t in trials if t.number in before} == before  # completed trials kept
    assert sum(t.state == COMPLETE for t in trials) == 3
    assert not [t for t in trials if t.state == RUNNING]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """`harness dashboard` on a journal of its own, in a subprocess on a free port."""
    root = tmp_path_factory.mktemp("dashboard")
    port, log = free_port(), root / "dashboard.log"
    open_storage(str(root / "optuna.journal"))  # an empty journal: the dashboard refuses a path that is not one
    process = subprocess.Popen(harness("--results-dir", str(root / "results"), "dashboard", "--storage",
                                       str(root / "optuna.journal"), "--port", str(port)),
                               env={**os.environ, **ENV}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    while True:
        try:
            get(url + "/api/studies")
            break
        except OSError:
            assert process.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
    yield url, root, log
    process.terminate()
    process.wait(timeout=10)


def test_dashboard_answers(dashboard):
    url, root, log = dashboard
    status, body = get(url + "/dashboard/")
    assert status == 200 and b"<html" in body.lower()
    status, body = get(url + "/api/studies")
    assert status == 200 and "study_summaries" in json.loads(body)
    assert log.read_text().splitlines()[0].startswith(f"optuna-dashboard: {url}/dashboard/")


def test_two_workers_while_the_dashboard_polls(dashboard, tmp_path):
    url, root, log = dashboard
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    args = ["--results-dir", str(root / "results"), "tune", "--dataset", "synthetic", "--study", str(study),
            "--storage", str(root / "optuna.journal"), "--device", "cpu", "--epochs", "2", "--trials", "6",
            "--workers", "2"]
    out = tmp_path / "tune.log"
    tune = subprocess.Popen(harness(*args), env={**os.environ, **ENV}, stdout=open(out, "w"), stderr=subprocess.STDOUT)
    polls = 0
    while tune.poll() is None:
        status, body = get(url + "/api/studies")
        assert status == 200 and "study_summaries" in json.loads(body)
        polls += 1
        time.sleep(0.05)
    output = out.read_text()
    assert tune.returncode == 0, output
    assert polls > 5
    trials = optuna.load_study(study_name="sasrec-synthetic", storage=open_storage(str(root / "optuna.journal"))).trials
    assert [t.number for t in trials] == list(range(len(trials)))  # every number once, none lost
    assert all(t.state == COMPLETE for t in trials) and len(trials) >= 6
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers ran trials
    assert "[w1] trial" in output and "[w2] trial" in output and "started 2 workers (1 torch thread each)" in output
    # workers share the terminal: a plain line per event (a trial started, finished), no epoch lines or bars
    assert re.search(r"^\[w[12]\] trial \d+ \(\d/6\) started: layers=", output, re.M), output
    assert not re.search(r"epoch \d+/2|[━╺╸] *(trial|epoch|batch) \d", output), output
    for text in (output, log.read_text()):
        assert "database is locked" not in text and "Traceback" not in text
    status, body = get(url + "/api/studies")
    assert "sasrec-synthetic" in [s["study_name"] for s in json.loads(body)["study_summaries"]]


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_AUTO_FETCH", "0")  # never the network
    empty = tmp_path / "data"
    empty.mkdir()
    r = invoke("tune", "--dataset", "instrument", "--data-dir", str(empty), "--storage", str(tmp_path / "j.journal"))
    one_line_error(r, "dataset 'instrument' not found", "harness data fetch instrument")
    assert not (tmp_path / "j.journal").exists()


def test_bad_storage_and_flag_clash_are_one_line(tmp_path):
    one_line_error(invoke("studies", "--storage", "redis://localhost:6379/0"), "--storage redis://", "unsupported")
    one_line_error(invoke("dashboard", "--storage", "ftp://x"), "--storage ftp://x")
    # a mistyped journal path: one line, and nothing created (no journal, no lock)
    for command in ("studies", "report", "dashboard"):
        one_line_error(invoke("--results-dir", str(tmp_path / "res"), command, "--storage", str(tmp_path / "none.journal")),
                       f"--storage {tmp_path / 'none.journal'}: no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    one_line_error(invoke(*tune_args(tmp_path, study, "--lr", "0.01")), "--lr:", "sets lr for every trial")
    one_line_error(invoke(*tune_args(tmp_path, study, "--model", "igr-sr")), "--model igr-sr", "tunes sasrec")


def test_studies_lists_experiment_grids_by_kind_and_dataset(tmp_path):
    """An experiment study is a grid of cells (several models, seeds...): `harness studies` names
    its kind and dataset, and shows no "best" across its cells; a tuning study keeps its best."""
    storage = open_storage(str(tmp_path / "optuna.journal"))
    grid = optuna.create_study(study_name="compare-synthetic", storage=storage, direction="maximize")
    cells = [json.dumps({"model": m, "dataset": "synthetic", "seed": 2020}) for m in ("sasrec", "igr-sr")]
    grid.set_user_attr("experiment", {"kind": "compare", "cells": cells})
    for value in (0.5, 0.9):
        grid.add_trial(optuna.trial.create_trial(value=value))
    tuned = optuna.create_study(study_name="sasrec-synthetic", storage=storage, direction="maximize")
    tuned.set_user_attr("definition", {"model": "sasrec", "dataset": "synthetic"})
    tuned.add_trial(optuna.trial.create_trial(value=0.25))
    rows = {r["study"]: r for r in list_studies(str(tmp_path / "optuna.journal"))}
    assert rows["compare-synthetic"] == {"study": "compare-synthetic", "kind": "compare", "dataset": "synthetic",
                                         "cells": 2, "complete": 2, "best": None, "best_trial": None}
    r = invoke("studies", "--storage", str(tmp_path / "optuna.journal"))
    assert r.exit_code == 0, r.output
    assert "compare on synthetic, 2 cells" in r.output and "? on ?" not in r.output and "0.9000" not in r.output
    assert "sasrec on synthetic" in r.output and "0.2500 (trial 0)" in r.output


def test_results_dir_after_tune_reaches_the_job_and_its_workers(tmp_path, monkeypatch):
    """--results-dir is taken after the subcommand too (as --data-dir), and a worker process gets
    it back on its command line."""
    import harness.tune

    seen = {}

    def fake_tune(job, worker_argv, worker_index, echo, progress=None):
        seen.update(results_dir=job.results_dir, argv=worker_argv("sasrec-synthetic", 1))

    monkeypatch.setattr(harness.tune, "tune", fake_tune)
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    r = invoke("tune", "--dataset", "synthetic", "--study", str(study), "--storage", str(tmp_path / "j.journal"),
               "--device", "cpu", "--workers", "2", "--results-dir", str(tmp_path / "res"))
    assert r.exit_code == 0, r.output
    assert seen["results_dir"] == tmp_path / "res"
    argv = seen["argv"]
    assert argv[argv.index("tune"):].count("--results-dir") == 1 and str(tmp_path / "res") in argv


def test_lines_say_1_epoch_and_1_trial():
    trial = optuna.trial.create_trial(value=0.5, params={}, distributions={},
                                      user_attrs={"epochs": 1, "best_epoch": 1, "test": {"ndcg@10": 0.4}})
    assert "(1 epoch, best 1)" in trial_line(trial)
    trial.user_attrs["epochs"] = 3
    assert "(3 epochs, best 1)" in trial_line(trial)


def test_unreachable_postgres_is_one_line(tmp_path):
    pytest.importorskip("psycopg2")
    url = f"postgresql://harness:secret@127.0.0.1:{free_port()}/optuna"
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    args = tune_args(tmp_path, study)
    args[args.index("--storage") + 1] = url
    line = one_line_error(invoke(*args), "--storage postgresql://harness:***@127.0.0.1:", "cannot open")
    assert "secret" not in line
    one_line_error(invoke("studies", "--storage", "postgresql://harness:secret@127.0.0.1:notaport/optuna"),
                   "--storage postgresql://harness:***@127.0.0.1:notaport/optuna: cannot open")


def test_failing_trials_keep_their_reason_and_stop_the_worker(tmp_path):
    study = tmp_path / "broken.toml"
    # 16 is not a multiple of 3 heads: a searched value, so each trial fails (a fixed one is refused up front)
    study.write_text(SMALL + 'heads = { type = "categorical", choices = [3] }\n')
    r = invoke(*tune_args(tmp_path, study, "--epochs", "1", "--trials", "6"))  # 5 failures in a row stop it first
    assert r.exit_code == 1, r.output
    trials = load(tmp_path).trials
    assert len(trials) == 5 and all(t.state == FAIL for t in trials)
    reason = trials[0].user_attrs["fail_reason"]
    assert "sasrec's hidden (16) must be a multiple of heads (3)" in reason and f"trial 0 failed: {reason}" in r.output
    assert "5 trials in a row failed" in r.output


def test_summary_with_enough_trials_has_importances(tmp_path):
    from harness.runs import RunSpec
    from harness.studies import TuneJob, load_study_file
    from harness.tune import open_study, summarize

    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    job = TuneJob(study_file=load_study_file(path), dataset="synthetic", results_dir=tmp_path / "results",
                  base=RunSpec(model="sasrec", dataset="synthetic"), storage_url=str(tmp_path / "optuna.journal"))
    study, _ = open_study(job, open_storage(job.storage_url))
    distributions = {"layers": optuna.distributions.IntDistribution(1, 2),
                     "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)}
    rng = np.random.default_rng(0)
    for i in range(12):  # value grows with lr, layers is noise: lr must matter most
        lr = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))
        study.add_trial(optuna.trial.create_trial(
            params={"layers": int(rng.integers(1, 3)), "lr": lr}, distributions=distributions, value=lr * 10,
            user_attrs={"epochs": 3, "epoch_cap": 3, "test": {"ndcg@10": lr}}))
    study.add_trial(optuna.trial.create_trial(params={"layers": 1, "lr": 1e-3}, distributions=distributions,
                                              state=PRUNED, user_attrs={"epochs": 1, "epoch_cap": 3}))
    s = summarize(study, job, [])
    assert s.counts == {"complete": 12, "pruned": 1} and (s.epochs_trained, s.epochs_unpruned) == (37, 39)
    assert list(s.importances)[0] == "lr" and not s.importance_note
    assert s.outputs["importances"].read_text().splitlines()[0] == "parameter,importance"
    assert len(s.outputs["top_csv"].read_text().splitlines()) == 11  # header + top 10
    assert len(s.outputs["trials"].read_text().splitlines()) == 14


def test_settings_that_would_fail_every_trial_are_refused_before_the_first(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    args = tune_args(tmp_path, study)
    args[args.index("--device") + 1] = "cuda"
    one_line_error(invoke(*args), "--device cuda", "CUDA is not available")
    assert not (tmp_path / "optuna.journal").exists()  # no study, no failed trials
    study.write_text(SMALL.replace('model = "sasrec"', 'model = "sasrek"'))
    one_line_error(invoke(*tune_args(tmp_path, study)), str(study), "unknown model 'sasrek'")
    study.write_text(SMALL.replace("inner = 32", "inner = 32\nwidth = 3"))
    one_line_error(invoke(*tune_args(tmp_path, study)), "fixed.width", "not a parameter of sasrec")
