"""MostPop: its scores are the training-part counts (validation and test targets never counted),
alike for every user; it ranks through the shared trainer in one epoch with no trainable
parameters; `harness train` and an experiment cell run it; the tuning pipeline leaves it out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import models
from harness.cli import cli
from harness.data.registry import cache_dir, load
from harness.data.sequences import SequenceData
from harness.data.split import LeaveOneOut
from harness.metrics import metrics_from_ranks
from harness.train import TrainConfig, evaluate, fit
from models.mostpop import MostPop

CPU = torch.device("cpu")


def build(n_items: int) -> MostPop:
    spec = models.get("mostpop")
    return spec.build(spec.make_config(), n_items)


def split_of(path: Path, tmp_path: Path, max_len: int = 50) -> LeaveOneOut:
    return LeaveOneOut(load(str(path), tmp_path, tmp_path / "cache"), max_len=max_len)


def counted(data: LeaveOneOut) -> np.ndarray:
    """Each item's occurrences in the users' sequences but their last two items, user by user."""
    c = np.zeros(data.n_items + 1, dtype=np.int64)
    for u in range(data.n_users):
        for item in data.flat[data.offsets[u]:data.offsets[u + 1]][:-2]:
            c[item] += 1
    return c


def pessimistic_ranks(data: LeaveOneOut, counts: np.ndarray, split: str, mask_history: bool = False) -> np.ndarray:
    """Per user: how many other real items have a count at least the target's (ties against it),
    history items left out under `mask_history` (the target never is)."""
    back = 2 if split == "valid" else 1
    out = np.empty(data.n_users, dtype=np.int64)
    for u in range(data.n_users):
        seq = data.flat[data.offsets[u]:data.offsets[u + 1]]
        target, history = seq[-back], set(seq[:-back].tolist())
        out[u] = sum(1 for i in range(1, data.n_items + 1) if i != target and counts[i] >= counts[target]
                     and not (mask_history and i in history))
    return out


def test_scores_are_the_hand_counted_training_items(tiny_file, tmp_path):
    """TINY_LINES: user 10 trains on 5 3 8 2 9 4 (7 valid, 6 test), user 20 on 1 (2 valid, 3 test),
    user 30 on 6 1 4 (12 valid, 2 test)."""
    data = split_of(tiny_file, tmp_path)
    model = build(data.n_items)
    assert data.n_items == 12 and not list(model.parameters())
    model.on_epoch_start(1, data)
    expected = {1: 2, 2: 1, 3: 1, 4: 2, 5: 1, 6: 1, 8: 1, 9: 1}  # every other id 0
    want = torch.tensor([float(expected.get(i, 0)) for i in range(13)])
    batch = next(data.eval_batches("test"))
    scores = model.scores(batch)
    assert scores.shape == (3, 13) and scores.dtype == torch.float32
    assert torch.equal(scores, want.expand(3, -1))  # the same row for every user
    # only ever targets: 7 (valid), 12 (valid); 2 and 3 are counted once, in user 10's training part,
    # though each occurs twice more as a target
    assert scores[0, 7] == 0 and scores[0, 12] == 0 and scores[0, 2] == 1 and scores[0, 3] == 1


def test_validation_and_test_targets_are_never_counted(small_split):
    data = small_split
    model = build(data.n_items)
    model.on_epoch_start(1, data)
    assert torch.equal(model.counts, torch.from_numpy(counted(data)).float())
    assert model.counts.sum() == int(np.maximum(data.train_len, 0).sum())  # every training item once
    # every user's validation and test target replaced by item 1: not a single count moves
    last_two = np.concatenate([data.offsets[1:] - 2, data.offsets[1:] - 1])
    items = data.flat.copy()
    items[last_two] = 1
    other = LeaveOneOut(SequenceData(items=items, offsets=data.offsets, user_ids=data.data.user_ids,
                                     n_items=data.n_items), max_len=data.max_len)
    again = build(data.n_items)
    again.on_epoch_start(1, other)
    assert torch.equal(again.counts, model.counts)
    # while one changed training item does (the counts do read the data)
    items = data.flat.copy()
    first = int(data.offsets[0])
    items[first] = items[first] % data.n_items + 1
    changed = build(data.n_items)
    changed.on_epoch_start(1, LeaveOneOut(SequenceData(items=items, offsets=data.offsets, user_ids=data.data.user_ids,
                                                       n_items=data.n_items), max_len=data.max_len))
    diff = (changed.counts - model.counts).nonzero().flatten().tolist()
    assert diff == sorted([int(data.flat[first]), int(items[first])])


def test_ranks_through_the_shared_trainer_in_one_epoch(small_split):
    data = small_split
    model = build(data.n_items)
    # before any counting every item ties, and ties count against the target: last place
    untrained = evaluate(model, data, "test", CPU, batch_size=16)
    assert (untrained == data.n_items - 1).all()
    cfg = TrainConfig(epochs=30, patience=3, batch_size=32, eval_batch_size=16, device="cpu", precision="fp32")
    result = fit(model, data, cfg, progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    assert result.stopped == "one epoch (no trainable parameters)"
    assert result.curves[0]["loss"] == 0.0
    counts = counted(data)
    for split, ranks in (("valid", result.valid_ranks), ("test", result.test_ranks)):
        want = pessimistic_ranks(data, counts, split)
        assert np.array_equal(ranks, want), split
        assert getattr(result, split) == pytest.approx(metrics_from_ranks(want))
    # popularity beats the all-ties floor on this data: the counts are used, not just stored
    assert result.test["recall@20"] > metrics_from_ranks(untrained)["recall@20"]
    masked = evaluate(model, data, "test", CPU, mask_history=True, batch_size=16)
    assert np.array_equal(masked, pessimistic_ranks(data, counts, "test", mask_history=True))
    assert result.other_protocol["test"] == pytest.approx(metrics_from_ranks(masked))
    # the counts are the state dict: a reloaded model ranks alike without seeing the data
    reloaded = build(data.n_items)
    reloaded.load_state_dict(model.state_dict())
    assert np.array_equal(evaluate(reloaded, data, "test", CPU, batch_size=16), result.test_ranks)


def test_harness_train_runs_one_epoch_and_records_its_ranks(tmp_path):
    results = tmp_path / "results"
    r = CliRunner().invoke(cli, ["--results-dir", str(results), "train", "--model", "mostpop",
                                 "--dataset", "synthetic", "--device", "cpu"])  # the default epoch cap
    assert r.exit_code == 0, r.output
    (record,) = sorted((results / "runs").glob("*.json"))
    rec = json.loads(record.read_text())
    assert rec["model"] == "mostpop" and rec["model_config"] == {}
    assert rec["train_config"]["epochs"] == TrainConfig().epochs > 1
    assert rec["result"]["epochs_run"] == 1 and rec["result"]["best_epoch"] == 1
    data = LeaveOneOut(load("synthetic", tmp_path, cache_dir()), max_len=rec["train_config"]["max_len"])
    ranks = np.load(record.with_suffix(".npz"))
    counts = counted(data)
    assert np.array_equal(ranks["test_ranks"], pessimistic_ranks(data, counts, "test"))
    assert rec["result"]["test"] == pytest.approx(metrics_from_ranks(ranks["test_ranks"]))
    state = torch.load(record.with_suffix(".pt"))
    assert torch.equal(state["counts"], torch.from_numpy(counts).float())


def test_an_experiment_cell_runs_it_and_the_tuning_pipeline_leaves_it_out(tmp_path):
    from harness.errors import HarnessError
    from harness.paper_plan import default_models
    from harness.studies import study_file_for

    spec = models.get("mostpop")
    assert spec.display == "MostPop" and spec.description
    with pytest.raises(HarnessError):  # nothing to search: no study file ...
        study_file_for("mostpop")
    from harness.paper_plan import tuned, untuned

    names, left_out = default_models()  # ... so `harness paper` shows it in Table 2 but never tunes it
    assert "mostpop" in names and "mostpop" not in left_out
    assert untuned("mostpop") and "mostpop" not in tuned(names)
    r = CliRunner().invoke(cli, ["--results-dir", str(tmp_path / "res"), "compare", "--dataset", "synthetic",
                                 "--models", "mostpop", "--seeds", "1", "--device", "cpu", "--params", "paper",
                                 "--storage", str(tmp_path / "s.journal")])
    assert r.exit_code == 0, r.output
    assert "MostPop" in r.output
    import optuna

    from harness.store import open_storage

    study = optuna.load_study(study_name="compare-synthetic", storage=open_storage(str(tmp_path / "s.journal")))
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trial.user_attrs["epochs"] == 1  # under the experiment's default epoch cap
    data = LeaveOneOut(load("synthetic", tmp_path, cache_dir()))
    assert trial.value == pytest.approx(metrics_from_ranks(pessimistic_ranks(data, counted(data), "valid"))["ndcg@10"])
