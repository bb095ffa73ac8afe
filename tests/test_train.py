"""The shared trainer: early stopping, best checkpoint, seeds, callback, divergence, LID cache."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from harness.data.registry import load
from harness.data.split import LeaveOneOut
from harness.runs import RunSpec, build_model, run
from harness.train import TrainConfig, TrainingDiverged, evaluate, fit
from models.base import SequentialRecommender
from models.sasrec import SASRec, SASRecConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> LeaveOneOut:
    seqs = load("synthetic", tmp_path_factory.mktemp("d"), tmp_path_factory.mktemp("cache"))
    return LeaveOneOut(seqs, max_len=20)


def small_sasrec(data: LeaveOneOut) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(hidden=16, inner=32, max_len=20), data.n_items)


def test_fit_learns_and_restores_best_epoch(data):
    model = small_sasrec(data)
    res = fit(model, data, TrainConfig(epochs=6, patience=6, device="cpu", batch_size=64), progress=False)
    ndcg = [row["valid_ndcg@10"] for row in res.curves]
    assert res.epochs_run == 6 and res.best_epoch == int(np.argmax(ndcg)) + 1
    # the returned validation metric is the best epoch's, recomputed on the restored weights
    assert res.valid["ndcg@10"] == pytest.approx(max(ndcg), abs=1e-12)
    assert ndcg[-1] > 2 * ndcg[0]  # it learns the planted structure
    assert res.test["recall@10"] > 0.3  # random ranking would give ~10/120


def test_early_stopping_with_patience(data):
    model = small_sasrec(data)
    calls = []
    res = fit(model, data, TrainConfig(epochs=50, patience=1, device="cpu", batch_size=64, lr=0.3),
              on_epoch=lambda e, row: calls.append(e), progress=False)
    assert res.epochs_run < 50 and "early stop" in res.stopped
    assert res.epochs_run - res.best_epoch == 1
    assert calls == list(range(1, res.epochs_run + 1))


def test_same_seed_same_curves(data):
    cfg = TrainConfig(epochs=2, device="cpu", batch_size=64, seed=7)
    a = fit(small_sasrec(data), data, cfg, progress=False)
    b = fit(small_sasrec(data), data, cfg, progress=False)
    assert [r["loss"] for r in a.curves] == [r["loss"] for r in b.curves]
    assert np.array_equal(a.test_ranks, b.test_ranks)


def test_callback_can_stop_training(data):
    class Pruned(Exception):
        pass

    def prune(epoch, row):
        assert "valid_ndcg@10" in row
        if epoch == 2:
            raise Pruned

    with pytest.raises(Pruned):
        fit(small_sasrec(data), data, TrainConfig(epochs=5, device="cpu"), on_epoch=prune, progress=False)


class ExplodingModel(SequentialRecommender):
    def __init__(self, n_items: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.n_items = n_items

    def loss(self, batch):
        return {"loss": self.w.sum() * float("nan")}

    def scores(self, batch):
        return torch.zeros(batch.size, self.n_items + 1)


def test_nan_loss_ends_the_run_with_a_clear_error(data):
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1, batch 1"):
        fit(ExplodingModel(data.n_items), data, TrainConfig(epochs=3, device="cpu"), progress=False)


def test_constant_model_scores_near_zero(data):
    ranks = evaluate(ExplodingModel(data.n_items), data, "test", torch.device("cpu"))
    assert (ranks == data.n_items - 1).all()


def test_history_masking_only_helps_ranks(data):
    model = small_sasrec(data)
    plain = evaluate(model, data, "test", torch.device("cpu"))
    masked = evaluate(model, data, "test", torch.device("cpu"), mask_history=True)
    assert (masked <= plain).all() and (masked < plain).any()


def test_lid_encoder_is_pretrained_once_and_cached(tmp_path):
    spec = RunSpec(model="igr-sr", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "cache",
                   train=TrainConfig(epochs=1, device="cpu", batch_size=128), lid_epochs=2,
                   params={"d_l": "8", "k": "2", "m": "2"})
    from harness.runs import load_data

    data = load_data(spec)
    first, _, info1 = build_model(spec, data, progress=False)
    second, _, info2 = build_model(spec, data, progress=False)
    assert info1["cached"] is False and info2["cached"] is True
    assert info1["key"] == info2["key"] and info1["epochs_run"] == 2
    for (k, a), (_, b) in zip(first.lid.encoder.state_dict().items(), second.lid.encoder.state_dict().items()):
        assert torch.equal(a, b), k
    # another d_l is another encoder
    other, _, info3 = build_model(RunSpec(**{**spec.__dict__, "params": {"d_l": "16"}}), data, progress=False)
    assert info3["cached"] is False and info3["key"] != info1["key"]
    assert len(list((tmp_path / "cache" / "lid").glob("*.pt"))) == 2
    # a trial's own lr / batch size / weight decay are not the LID's recipe: the encoder is shared
    tuned = dataclasses.replace(spec.train, lr=7e-3, batch_size=64, weight_decay=1e-4)
    _, _, info4 = build_model(dataclasses.replace(spec, train=tuned), data, progress=False)
    assert info4["cached"] is True and info4["key"] == info1["key"] and info4["recipe"]["lr"] == 1e-3
    assert len(list((tmp_path / "cache" / "lid").glob("*.pt"))) == 2


def test_run_end_to_end_record(tmp_path):
    spec = RunSpec(model="igr-sr/wo-icr", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "c",
                   train=TrainConfig(epochs=1, device="cpu"), lid_epochs=1, params={"d_l": "8"})
    record = run(spec, progress=False)
    assert record.lid["d_l"] == 8 and record.model_config["use_icr"] is False
    assert record.test_ranks.shape == (300,) and record.data_hash
    assert set(record.result["test"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}


def test_interrupted_fit_resumes_to_the_same_result(data, tmp_path):
    cfg = TrainConfig(epochs=4, patience=10, device="cpu", batch_size=64, seed=3)
    straight = fit(small_sasrec(data), data, cfg, progress=False, checkpoint=tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()  # removed once training ended

    class Killed(Exception):
        pass

    def kill_after_two(epoch, row):
        if epoch == 2:
            raise Killed

    ckpt = tmp_path / "b.pt"
    with pytest.raises(Killed):
        fit(small_sasrec(data), data, cfg, on_epoch=kill_after_two, progress=False, checkpoint=ckpt)
    assert ckpt.is_file()
    seen = []
    resumed = fit(small_sasrec(data), data, cfg, on_epoch=lambda e, r: seen.append(e), progress=False,
                  checkpoint=ckpt)
    assert seen == [3, 4]  # only the missing epochs ran
    assert [r["loss"] for r in resumed.curves] == [r["loss"] for r in straight.curves]
    assert np.array_equal(resumed.test_ranks, straight.test_ranks)


def test_precision_is_part_of_the_run_identity(tmp_path):
    """The LID is pre-trained in the run's precision and cached under it; run records carry it."""
    from harness.runs import load_data, resume_path
    from harness.train import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    spec = RunSpec(model="igr-sr", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "cache",
                   train=TrainConfig(epochs=1, device="cpu", batch_size=128, precision="fp32"), lid_epochs=1,
                   params={"d_l": "8", "k": "2", "m": "2"})
    data = load_data(spec)
    _, cfg, fp32 = build_model(spec, data, progress=False)
    bf16_spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, precision="bf16"))
    _, _, bf16 = build_model(bf16_spec, data, progress=False)
    assert fp32["key"] != bf16["key"] and not bf16["cached"]
    assert resume_path(spec, data, cfg) != resume_path(bf16_spec, data, cfg)
    record = run(dataclasses.replace(bf16_spec, model="sasrec", params={"hidden": "8", "inner": "16"}),
                 progress=False)
    assert record.train_config["precision"] == "bf16"


def test_killed_pretraining_resumes_to_the_same_encoder(tmp_path, monkeypatch):
    """A pre-training (the LID here; LARES's stage 1 goes the same way) killed after an epoch goes
    on from its resume file the next time a run needs it, and caches the encoder an
    uninterrupted pre-training caches."""
    import harness.train as train_mod
    from harness.runs import load_data

    spec = RunSpec(model="igr-sr", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "straight",
                   train=TrainConfig(epochs=1, device="cpu", batch_size=128), lid_epochs=3, lid_patience=10,
                   params={"d_l": "8", "k": "2", "m": "2"})
    straight, _, info = build_model(spec, load_data(spec), progress=False)

    class Killed(Exception):
        pass

    save = train_mod._save_checkpoint

    def save_then_die(path, *args):
        save(path, *args)
        if len(args[-1]) == 2:  # curves: killed right after epoch 2 was saved
            raise Killed

    killed = dataclasses.replace(spec, cache_dir=tmp_path / "killed")
    data = load_data(killed)
    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        build_model(killed, data, progress=False)
    (resume,) = (killed.cache_dir / "lid").glob("*.resume.pt")
    monkeypatch.setattr(train_mod, "_save_checkpoint", save)
    resumed, _, info2 = build_model(killed, data, progress=False)
    assert not info2["cached"] and not resume.exists()
    assert info2["epochs_run"] == info["epochs_run"] == 3 and info2["valid"] == info["valid"]
    a, b = straight.lid.state_dict(), resumed.lid.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
