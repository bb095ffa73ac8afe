"""LARES stage 1 (`lares-ssl`): shapes, capacity, its three loss terms, the iterated core block
(shared weights, depth matters, causal so the "sequence" layout is exact), one epoch through the
shared trainer, and its study file. All tiny: the file runs in seconds on one thread."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from harness.data.split import Batch, LeaveOneOut
from models.lares import LARES, LARESConfig, sup_con
from helpers import achievable_accuracy

N_ITEMS = 40
MAX_LEN = 20
NAME = "lares-ssl"
NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0}


@pytest.fixture(scope="module")
def data(small_split) -> LeaveOneOut:
    return small_split


def build(seed: int = 0, **params) -> LARES:
    torch.manual_seed(seed)
    spec = models.get(NAME)
    return spec.build(spec.make_config(max_len=MAX_LEN, **params), N_ITEMS)


def first_batch(data: LeaveOneOut, batch_size: int = 32) -> Batch:
    return data.train_batches(LARES.layout, batch_size, np.random.default_rng(0))[0]


def eval_batch(items: list[list[int]]) -> Batch:
    lengths = torch.tensor([len(r) for r in items])
    L = int(lengths.max())
    x = torch.tensor([r + [0] * (L - len(r)) for r in items])
    zeros = torch.zeros(len(items), dtype=torch.long)
    return Batch(x, lengths, torch.zeros_like(x), zeros, zeros)


def grads(model: LARES, batch: Batch, seed: int = 5) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks and initial thoughts
    model.loss(batch)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in model.core.parameters()])


def test_registered_as_stage_one_only():
    spec = models.get(NAME)
    assert spec.config_cls is LARESConfig and "no GRPO" in spec.description
    assert "lares" not in models.names()  # the full two-stage model is not claimed


def test_loss_terms_and_score_shapes(data):
    model = build()
    batch = first_batch(data)
    out = model.loss(batch)
    assert set(out) == {"loss", "ce", "traj", "step"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert out["traj"] > 0 and out["step"] > 0
    cfg = model.cfg
    assert torch.allclose(out["loss"].detach(), out["ce"] + cfg.traj_weight * out["traj"] + cfg.step_weight * out["step"])
    with torch.no_grad():
        thoughts = model.reason(model.pre_block(batch.items))
    assert thoughts.shape == (cfg.iterations, *batch.items.shape, cfg.hidden)
    model.eval()
    scores = model.scores(next(data.eval_batches("valid", 16)))
    assert scores.shape == (16, N_ITEMS + 1) and torch.isfinite(scores).all()


def test_terms_finite_in_every_variant(data):
    batch = first_batch(data)
    for params in ({"traj_views": 1}, {"aggregate": "concat"}, {"iterations": 1}, {"sigma": 0.0}):
        out = build(**params).loss(batch)
        assert all(torch.isfinite(v) for v in out.values()), params
    assert set(build(iterations=1).loss(batch)) == {"loss", "ce", "traj"}  # no step pairs for k = 1
    assert set(build(traj_weight=0.0, step_weight=0.0).loss(batch)) == {"loss", "ce"}


def test_overfits_a_tiny_batch(data):
    model = build(**NO_DROPOUT)
    batch = first_batch(data, batch_size=24)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = last = None
    for _ in range(100):
        out = model.loss(batch)
        last = out["ce"].item()
        first = last if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        has = batch.targets > 0
        hits = (model.encode(batch.items)[has] @ model.item_emb.weight.T).argmax(-1) == batch.targets[has]
    assert last < 0.25 * first
    assert hits.float().mean() >= achievable_accuracy(batch) - 1e-6


@pytest.mark.parametrize("term", ["traj_weight", "step_weight"])
def test_alignment_weights_change_the_gradients(data, term):
    batch = first_batch(data)
    on = grads(build(seed=3), batch)
    off = grads(build(seed=3, **{term: 0.0}), batch)
    assert not torch.allclose(on, off)


def test_trajectory_alignment_uses_same_target_positives():
    """sup_con: positives are the other rows with the same label; rows without one are skipped."""
    torch.manual_seed(0)
    z, labels, tau = torch.randn(5, 8), torch.tensor([1, 2, 1, 3, 1]), 0.5
    zn = F.normalize(z, dim=-1)
    sim = zn @ zn.T / tau
    manual = []
    for a in range(5):
        pos = [p for p in range(5) if p != a and labels[p] == labels[a]]
        if pos:
            log_prob = sim[a] - torch.logsumexp(torch.cat([sim[a, :a], sim[a, a + 1:]]), 0)
            manual.append(-log_prob[pos].mean())
    assert sup_con(z, labels, tau).item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)
    assert sup_con(z, torch.arange(5), tau).item() == 0.0  # no positives at all


def test_deterministic_with_a_seed(data):
    batch = first_batch(data)
    losses = []
    for _ in range(2):
        model = build(seed=7)
        torch.manual_seed(11)  # dropout and the initial thoughts
        losses.append(model.loss(batch)["loss"].item())
    assert losses[0] == losses[1]
    torch.manual_seed(11)
    assert build(seed=8).loss(batch)["loss"].item() != losses[0]
    model = build(seed=7, **NO_DROPOUT).eval()  # evaluation: T_0 = 0, no randomness at all
    eb = eval_batch([[3, 5, 9], [1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model.scores(eb), model.scores(eb))
        model.train()  # training draws a new random initial thought every pass
        assert not torch.equal(model.encode(eb.items), model.encode(eb.items))


def test_iterations_matter_with_shared_weights():
    params = [sum(p.numel() for p in build(iterations=k).parameters()) for k in (1, 4, 8)]
    assert params[0] == params[1] == params[2]  # one core block, reused k times
    model = build(iterations=2).eval()
    eb = eval_batch([[3, 5, 9], [1, 2, 3, 4]])
    with torch.no_grad():
        h = model.pre_block(eb.items)
        t = model.reason(h, iterations=5)
        assert torch.equal(model.encode(eb.items), t[1])  # k = cfg.iterations
        for i in range(4):
            assert not torch.allclose(t[i], t[i + 1], atol=1e-4)  # every further step changes the thought
        by_k = [model.scores(eb)]
        model.cfg.iterations = 3
        by_k.append(model.scores(eb))
    assert not torch.allclose(by_k[0], by_k[1], atol=1e-4)


def test_core_step_is_the_papers_recurrence():
    """T_i = C(LN(f(T_{i-1}, H))) with f = addition, or a linear map of [T; H]."""
    for aggregate in ("add", "concat"):
        model = build(aggregate=aggregate, iterations=3).eval()
        items = torch.tensor([[4, 9, 2, 7]])
        with torch.no_grad():
            h = model.pre_block(items)
            t = torch.zeros_like(h)  # T_0 in evaluation
            for _ in range(3):
                x = t + h if aggregate == "add" else model.adapter(torch.cat([t, h], -1))
                x = model.core_ln(x)
                for block in model.core:
                    x = block(x)
                t = x
            assert torch.allclose(model.encode(items), t, atol=1e-6)


def test_causal_so_the_sequence_layout_is_exact():
    """The state at position j is the state of the prefix items[:j+1] alone."""
    model = build().eval()
    row = torch.tensor([[5, 3, 8, 2, 9, 4]])
    with torch.no_grad():
        full = model.encode(row)
        for j in range(1, 6):
            assert torch.allclose(full[0, j - 1], model.encode(row[:, :j])[0, -1], atol=1e-5)


def test_one_epoch_through_the_shared_trainer(data):
    from harness.train import TrainConfig, fit

    result = fit(build(), data, TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN),
                 progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    for split in (result.valid, result.test):
        assert split and all(np.isfinite(v) for v in split.values())
    curve = result.curves[0]
    assert all(np.isfinite(curve[k]) for k in ("loss", "ce", "traj", "step"))


def test_study_file_loads_with_the_defaults_first():
    from harness.studies import load_study_file

    sf = load_study_file(Path(__file__).resolve().parents[1] / "studies" / f"{NAME}.toml")
    assert sf.model == NAME and sf.enqueue
    assert [p.name for p in sf.space] == ["iterations", "traj_weight", "step_weight", "lr"]
    defaults = asdict(LARESConfig())
    first = sf.enqueue[0]
    assert all(first[k] == defaults[k] for k in first if k != "lr") and first["lr"] == 1e-3
