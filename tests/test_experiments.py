"""Experiments: noise, resumable grids (a killed ablation finishes only its missing cells),
and the report built from stored runs."""
from __future__ import annotations

import dataclasses
import os
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

from harness.cli import cli
from harness.data.noise import perturb, training_positions
from harness.data.registry import load
from harness.data.split import LeaveOneOut
from harness.runs import RunSpec, load_data

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--lid-epochs", "1", "--device", "cpu", "--params", "paper"]


def test_noise_rate_is_exact_and_targets_untouched(tmp_path):
    data = load("synthetic", tmp_path, tmp_path / "c")
    items, changed = perturb(data, 0.2, seed=5)
    train = training_positions(data)
    assert changed.size == round(0.2 * train.size)
    assert np.isin(changed, train).all()
    assert (items[changed] != data.items[changed]).all()  # every chosen item really changed
    untouched = np.setdiff1d(np.arange(data.items.size), changed)
    assert np.array_equal(items[untouched], data.items[untouched])
    last_two = np.concatenate([data.offsets[1:] - 1, data.offsets[1:] - 2])
    assert np.array_equal(items[last_two], data.items[last_two])  # valid/test targets
    assert items.min() >= 1 and items.max() <= data.n_items
    again, _ = perturb(data, 0.2, seed=5)
    assert np.array_equal(items, again)


def _completed(storage: Path, name: str) -> int:
    from harness.store import open_storage

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(str(storage)))
    except KeyError:
        return 0
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_killed_ablation_resumes_only_missing_cells(tmp_path):
    storage = tmp_path / "exp.journal"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "harness", "--results-dir", str(tmp_path / "res"), "ablate",
           "--dataset", "synthetic", "--seeds", "2", "--variants", "igr-sr/wo-lid,igr-sr/wo-icr",
           "--storage", str(storage), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while _completed(storage, "ablate-synthetic") < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _completed(storage, "ablate-synthetic")
    assert 1 <= done_before < 4

    result = CliRunner().invoke(cli, ["--results-dir", str(tmp_path / "res"), "ablate", "--dataset", "synthetic",
                                      "--seeds", "2", "--variants", "igr-sr/wo-lid,igr-sr/wo-icr",
                                      "--storage", str(storage), *TINY],
                                env={"HARNESS_CACHE_DIR": str(tmp_path / "cache")}, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"{done_before} of 4 cells already done; running {4 - done_before}" in result.output
    assert _completed(storage, "ablate-synthetic") == 4
    assert (tmp_path / "res" / "report" / "ablate-synthetic.tex").is_file()
    assert (tmp_path / "res" / "report" / "ablate-synthetic-figure.png").is_file()


def test_robustness_and_report(tmp_path):
    args = ["--results-dir", str(tmp_path / "res"), "robustness", "--dataset", "synthetic", "--models", "sasrec",
            "--noise", "0.3", "--seeds", "1", "--storage", str(tmp_path / "s.journal"), *TINY]
    result = CliRunner().invoke(cli, args, env={"HARNESS_CACHE_DIR": str(tmp_path / "c")}, terminal_width=200)
    assert result.exit_code == 0, result.output
    tex = (tmp_path / "res" / "report" / "robustness-synthetic.tex").read_text()
    assert "SASRec" in tex and r"$\downarrow$" in tex and "+30\\% noise" in tex
    epochs = TINY[TINY.index("--epochs") + 1]
    assert f"trained at most {epochs} epoch{'s' * (epochs != '1')}," in tex  # a capped run says so in its caption
    assert "Parameters: paper defaults." in tex  # and says where its parameters came from
    rebuilt = CliRunner().invoke(cli, ["--results-dir", str(tmp_path / "res"), "report", "--storage",
                                       str(tmp_path / "s.journal")], terminal_width=200)
    assert rebuilt.exit_code == 0 and "1 experiment(s) reported" in rebuilt.output
    csv = pd.read_csv(tmp_path / "res" / "report" / "robustness-synthetic.csv")
    drop = csv["drop_pct"].iloc[0]
    assert f"{drop:.1f}" in rebuilt.output and f"{drop:.4f}" not in rebuilt.output  # a percentage, as one
    assert csv["metric"].tolist() == ["Recall@10", "NDCG@10"] and csv["n_seeds"].eq(1).all()
    assert (csv["drop_ci95_low"] <= csv["drop_pct"]).all() and (csv["drop_pct"] <= csv["drop_ci95_high"]).all()
    # one epoch: every run hit the cap, and the table marks it; one seed: intervals over users only
    assert csv["clean_max_epochs"].all() and r"$^\dagger$" in tex and "epoch cap" in tex
    assert "test users only" in tex


@pytest.mark.parametrize("noise_on, trained_on, evaluated_on", [("all", "noisy", "noisy"),
                                                                ("train", "noisy", "clean"),
                                                                ("eval", "clean", "noisy")])
def test_noise_on_picks_which_histories_are_perturbed(tmp_path, noise_on, trained_on, evaluated_on):
    spec = RunSpec(model="sasrec", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "c",
                   noise=0.3, noise_seed=1, noise_on=noise_on)
    split = load_data(spec)
    clean = load("synthetic", tmp_path, tmp_path / "c")
    noisy, _ = perturb(clean, 0.3, seed=1)
    expect = {"clean": clean.items, "noisy": noisy}
    assert np.array_equal(split.flat, expect[trained_on])  # what the training batches read
    batch = next(split.eval_batches("test", batch_size=clean.n_users))
    hist_end = clean.offsets[1:][batch.users.numpy()] - 1
    first = hist_end - batch.lengths.numpy()
    read = np.array([expect[evaluated_on][a:b] for a, b in zip(first[:5], first[:5] + batch.lengths.numpy()[:5])],
                    dtype=object)
    for row, items, n in zip(batch.items.numpy()[:5], read, batch.lengths.numpy()[:5]):
        assert np.array_equal(row[:n], items)
    assert np.array_equal(batch.target.numpy(), clean.items[hist_end])  # targets never perturbed
    if noise_on != "all":  # a different evaluation makes a different run: keys must differ
        assert split.content_key != LeaveOneOut(split.data).content_key


def test_eval_data_must_be_a_version_of_the_training_data(tmp_path):
    clean = load("synthetic", tmp_path, tmp_path / "c")
    moved = clean.items.copy()
    moved[clean.offsets[1] - 1] = moved[clean.offsets[1] - 1] % clean.n_items + 1  # user 0's test target
    with pytest.raises(ValueError, match="not a version of"):
        LeaveOneOut(clean, eval_data=dataclasses.replace(clean, items=moved))
    noisy, _ = perturb(clean, 0.5, seed=0)  # histories may differ, targets may not
    LeaveOneOut(clean, eval_data=dataclasses.replace(clean, items=noisy))


def test_robustness_noise_on_train_reuses_the_clean_cells_and_says_so(tmp_path):
    base = ["--results-dir", str(tmp_path / "res"), "robustness", "--dataset", "synthetic", "--models", "sasrec",
            "--noise", "0.3", "--seeds", "1", "--storage", str(tmp_path / "s.journal"), *TINY]
    env = {"HARNESS_CACHE_DIR": str(tmp_path / "c")}
    assert CliRunner().invoke(cli, base, env=env).exit_code == 0
    result = CliRunner().invoke(cli, base + ["--noise-on", "train"], env=env, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "1 of 2 cells already done; running 1" in result.output  # the clean cell is the same run
    tex = (tmp_path / "res" / "report" / "robustness-synthetic.tex").read_text()
    assert "in the training samples only" in tex


def test_unknown_model_in_an_experiment_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["compare", "--dataset", "synthetic", "--models", "sasrec,nosuch",
                                      "--storage", str(tmp_path / "s.journal"), *TINY])
    assert result.exit_code != 0 and "unknown model 'nosuch'" in result.output
    assert "Traceback" not in result.output


def test_sensitivity_grid_over_k_and_m(tmp_path):
    args = ["--results-dir", str(tmp_path / "res"), "sensitivity", "--dataset", "synthetic", "--k", "2,4",
            "--m", "1", "--seeds", "1", "--storage", str(tmp_path / "s.journal"), *TINY]
    result = CliRunner().invoke(cli, args, env={"HARNESS_CACHE_DIR": str(tmp_path / "c")}, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "0 of 2 cells already done; running 2" in result.output
    # each cell's line names the k and m it trains (what the grid varies), not m, which it does not
    assert "[1/2] IGR-SR on synthetic k=2 seed 2020" in result.output
    assert "[2/2] IGR-SR on synthetic k=4 seed 2020" in result.output
    tex = (tmp_path / "res" / "report" / "sensitivity-synthetic.tex").read_text()
    assert "k=2" in tex and "k=4" in tex and "m=1" in tex and "$^*$" not in tex
    assert r"$^\dagger$" in tex  # one epoch: the runs hit the cap
    csv = pd.read_csv(tmp_path / "res" / "report" / "sensitivity-synthetic.csv")
    assert list(csv.columns) == ["k", "m", "metric", "mean", "std", "ci95_low", "ci95_high", "n_seeds", "max_epochs"]
    assert len(csv) == 4 and (csv["ci95_low"] <= csv["mean"]).all() and (csv["mean"] <= csv["ci95_high"]).all()
    assert (tmp_path / "res" / "report" / "sensitivity-synthetic-figure.png").stat().st_size > 1000
    bad = CliRunner().invoke(cli, ["sensitivity", "--dataset", "synthetic", "--k", "2,x"])
    assert bad.exit_code != 0 and "--k" in bad.output


def test_seed_sets_the_first_seed_and_a_wider_grid_reuses_its_cells(tmp_path):
    """`--seeds 1 --seed 2021` runs seed 2021's cell; a later `--seeds 2` (2020, 2021) runs only 2020's."""
    base = ["--results-dir", str(tmp_path / "res"), "ablate", "--dataset", "synthetic", "--variants",
            "igr-sr/wo-lid", "--storage", str(tmp_path / "s.journal"), *TINY]
    env = {"HARNESS_CACHE_DIR": str(tmp_path / "c")}
    first = CliRunner().invoke(cli, [*base, "--seeds", "1", "--seed", "2021"], env=env, terminal_width=200)
    assert first.exit_code == 0, first.output
    assert "0 of 1 cells already done; running 1" in first.output and "seed 2021" in first.output
    both = CliRunner().invoke(cli, [*base, "--seeds", "2"], env=env, terminal_width=200)
    assert both.exit_code == 0, both.output
    assert "1 of 2 cells already done; running 1" in both.output and "seed 2020" in both.output
    from harness.store import open_storage

    study = optuna.load_study(study_name="ablate-synthetic", storage=open_storage(str(tmp_path / "s.journal")))
    seeds = sorted(t.user_attrs["cell_info"]["seed"] for t in study.trials if t.state.name == "COMPLETE")
    assert seeds == [2020, 2021]
    # the report reads the per-user ranks from the results dir the runs wrote to
    elsewhere = CliRunner().invoke(cli, ["--results-dir", str(tmp_path / "other"), "report", "--storage",
                                         str(tmp_path / "s.journal")], terminal_width=200)
    assert elsewhere.exit_code != 0 and "another --results-dir" in elsewhere.output
    assert "Traceback" not in elsewhere.output


def test_completed_cells_follow_the_definition_order_not_the_finishing_order():
    from harness.experiments import completed_cells

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("experiment", {"kind": "compare", "cells": ["gru4rec", "sasrec", "igr-sr"]})
    for cell in ("igr-sr", "gru4rec", "stale-cell", "sasrec"):  # finished in another order
        trial = study.ask()
        trial.set_user_attr("cell", cell)
        study.tell(trial, 0.1)
    assert [t.user_attrs["cell"] for t in completed_cells(study)] == ["gru4rec", "sasrec", "igr-sr"]


def test_lid_is_pretrained_on_the_training_data_whatever_the_evaluation_reads(tmp_path):
    """noise on "all" and on "train" train on the same noisy data: one cached LID serves both."""
    from harness.runs import build_model

    keys = {}
    for noise_on in ("all", "train"):
        spec = RunSpec(model="igr-sr", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "c",
                       noise=0.3, noise_on=noise_on, lid_epochs=1,
                       params={"d_l": "8", "k": "2", "m": "1", "hidden": "16", "inner": "32"})
        _, _, lid = build_model(spec, load_data(spec), progress=False)
        keys[noise_on] = (lid["key"], lid["cached"])
    assert keys["all"][0] == keys["train"][0] and keys["train"][1] is True


def test_settings_that_would_fail_every_cell_are_refused_before_the_first(tmp_path, monkeypatch):
    import json

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    storage = str(tmp_path / "s.journal")
    base = ["--results-dir", str(tmp_path / "res"), "compare", "--dataset", "synthetic", "--models", "sasrec",
            "--seeds", "1", "--epochs", "1", "--storage", storage]

    def one_line(result, *needles):
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        (line,) = result.output.strip().splitlines()[-1:]
        assert line.startswith("Error: ") and all(n in line for n in needles), line

    one_line(CliRunner().invoke(cli, [*base, "--device", "cuda", "--params", "paper"]), "--device cuda")
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"hiddn": 16}))
    one_line(CliRunner().invoke(cli, [*base, "--device", "cpu", "--params", str(bad)]), f"--params {bad}", "hiddn")
    bad.write_text(json.dumps({"hidden": "wide"}))  # a value the model's config cannot take
    one_line(CliRunner().invoke(cli, [*base, "--device", "cpu", "--params", str(bad)]), "hidden", "expected int")
    assert _completed(tmp_path / "s.journal", "compare-synthetic") == 0
    from harness.store import open_storage

    names = optuna.study.get_all_study_names(open_storage(storage))
    assert all(not optuna.load_study(study_name=n, storage=open_storage(storage)).get_trials() for n in names)


def test_compare_gives_each_model_its_study_files_patience_unless_given(tmp_path):
    """ICLRec's study file says patience 40 (its code's): its compare cells train with it, SASRec's
    with the flag's default, and the caption says so; a --patience given on the command line wins."""
    from harness.store import open_storage

    env = {"HARNESS_CACHE_DIR": str(tmp_path / "c")}

    def compare(storage: str, *more: str):
        args = ["--results-dir", str(tmp_path / storage), "compare", "--dataset", "synthetic", "--models",
                "sasrec,iclrec", "--seeds", "1", "--storage", str(tmp_path / f"{storage}.journal"), *TINY, *more]
        result = CliRunner().invoke(cli, args, env=env, terminal_width=200)
        assert result.exit_code == 0, result.output
        study = optuna.load_study(study_name="compare-synthetic",
                                  storage=open_storage(str(tmp_path / f"{storage}.journal")))
        patience = {t.user_attrs["cell_info"]["model"]: t.user_attrs["train_config"]["patience"]
                    for t in study.trials if t.state.name == "COMPLETE"}
        tex = (tmp_path / storage / "report" / "compare-synthetic.tex").read_text()
        return result.output, patience, tex

    output, patience, tex = compare("own")
    assert patience == {"sasrec": 10, "iclrec": 40}
    csv = pd.read_csv(tmp_path / "own" / "report" / "compare-synthetic.csv")
    assert {"Dataset", "Metric", "Model", "mean", "std", "ci95_low", "ci95_high", "max_epochs", "n_seeds"} <= set(csv)
    assert len(csv) == 8 and csv["max_epochs"].all()  # 4 metrics x 2 models, one epoch each
    assert "trainer: iclrec: patience 40" in output
    assert "(early stop after 10 epochs without gain)" in tex
    assert "ICLRec: early stop after 40 epochs without gain (its study file's trainer setting)." in tex
    output, patience, tex = compare("given", "--patience", "7")
    assert patience == {"sasrec": 7, "iclrec": 7} and "trainer: iclrec" not in output
    assert "after 7 epochs without gain" in tex and "ICLRec: early stop" not in tex


def test_a_cell_without_a_budget_of_its_own_keeps_its_key():
    import json

    from harness.experiments import Cell
    from harness.train import TrainConfig

    train = {"patience": 10, "epochs": 200}
    plain = Cell("sasrec", "toys", 2020, (("lr", 1e-3),))
    assert plain.key(train) == json.dumps({"model": "sasrec", "dataset": "toys", "seed": 2020, "params": {"lr": 1e-3},
                                           "noise": 0.0, "train": train}, sort_keys=True)  # as stored before
    own = dataclasses.replace(plain, train=(("patience", 40),))
    assert json.loads(own.key(train))["train"] == {"patience": 40, "epochs": 200}
    spec = own.run_spec(RunSpec(model="x", dataset="y", train=TrainConfig(patience=10)))
    assert (spec.train.patience, spec.train.lr, spec.train.seed, spec.model) == (40, 1e-3, 2020, "sasrec")


def test_paper_and_best_params_carry_the_study_files_fixed_values(tmp_path):
    """A trial's params hold only the searched keys; the [fixed] values it trained with must come
    along, or `--params best|paper` runs another configuration than the one tuned."""
    import optuna
    from optuna.distributions import FloatDistribution

    from harness.experiments import best_params, default_params
    from harness.studies import load_study_file, study_file_for

    fixed = load_study_file(study_file_for("sasrec")).fixed
    assert fixed and fixed.items() <= default_params("sasrec").items()
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="sasrec-tiny", storage=storage, direction="maximize")
    for lr, value in ((1e-3, 0.1), (3e-3, 0.2)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, value=value,
                                                  distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}))
    params, origin = best_params("sasrec", "tiny", storage)
    assert params == {**fixed, "lr": 3e-3} and origin == "best of the first 2 trials of study sasrec-tiny"
    # the first-N rule of `harness paper`: a study tuned past its target gives no more trials, and a
    # trial that failed by itself (it diverged) counts toward N, while a setup failure does not
    study.set_user_attr("target", 3)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={
        "counts_toward_budget": True, "fail_reason": "training diverged"}))
    study.add_trial(optuna.trial.create_trial(params={"lr": 5e-3}, value=0.9,
                                              distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}))
    params, origin = best_params("sasrec", "tiny", storage)
    assert params["lr"] == 3e-3 and origin == "best of the first 3 trials of study sasrec-tiny, 1 of them failed"
    study.set_user_attr("target", 4)
    assert best_params("sasrec", "tiny", storage)[0]["lr"] == 5e-3
