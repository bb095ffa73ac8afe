"""harness/runs.py: one definition of a run's identity and of params -> RunSpec."""
from __future__ import annotations

import dataclasses

from harness.runs import NOT_IDENTITY, TRAINER_KEYS, RunSpec, train_identity
from harness.train import TrainConfig


def test_identity_is_every_trainer_setting_but_where_and_in_what_slices_it_computes():
    train = TrainConfig(device="cuda:1", eval_batch_size=4096, lr=3e-3)
    ident = train_identity(train)
    assert set(ident) == {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_IDENTITY)
    assert ident["lr"] == 3e-3
    assert train_identity(TrainConfig(device="cpu")) == train_identity(TrainConfig(device="cuda", eval_batch_size=8))
    assert "seed" not in train_identity(train, drop=("seed",))


def test_with_values_sends_trainer_keys_to_the_trainer_and_the_rest_to_the_model():
    base = RunSpec(model="sasrec", dataset="synthetic", params={"hidden": 16})
    spec = base.with_values({"lr": 5e-3, "batch_size": 64, "layers": 1}, model="igr-sr", seed=7, noise=0.2)
    assert spec.model == "igr-sr" and spec.noise == 0.2 and spec.dataset == "synthetic"
    assert (spec.train.lr, spec.train.batch_size, spec.train.seed) == (5e-3, 64, 7)
    assert spec.params == {"hidden": 16, "layers": 1}
    assert not set(spec.params) & set(TRAINER_KEYS)
    assert base.train.lr == TrainConfig().lr and base.params == {"hidden": 16}  # the base is untouched
