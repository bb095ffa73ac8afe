"""Baselines of Table 2 (GRU4Rec, BERT4Rec, ReaRec-ERL, ReaRec-PRL): shapes, capacity, their
own objectives, BERT4Rec's masking and evaluation token, ReaRec's reasoning steps, and one
epoch through the shared trainer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from harness.data.split import Batch, LeaveOneOut
from models.bert4rec import BERT4Rec, BERT4RecConfig, append_token
from models.rearec import ReaRecERL, ReaRecERLConfig, ReaRecPRL, ReaRecPRLConfig, pairwise_kl
from helpers import achievable_accuracy

N_ITEMS = 40
MAX_LEN = 20
NAMES = ["gru4rec", "bert4rec", "rearec-erl", "rearec-prl"]
NO_DROPOUT = {"gru4rec": {"dropout": 0.0},
              "bert4rec": {"dropout": 0.0, "attn_dropout": 0.0},
              "rearec-erl": {"dropout": 0.0, "attn_dropout": 0.0, "emb_dropout": 0.0},
              "rearec-prl": {"dropout": 0.0, "attn_dropout": 0.0, "emb_dropout": 0.0}}


@pytest.fixture(scope="module")
def data(small_split) -> LeaveOneOut:
    return small_split


def build(name: str, seed: int = 0, **params):
    torch.manual_seed(seed)
    spec = models.get(name)
    return spec.build(spec.make_config(max_len=MAX_LEN, **params), N_ITEMS)


def first_batch(data: LeaveOneOut, layout: str, batch_size: int = 32) -> Batch:
    return data.train_batches(layout, batch_size, np.random.default_rng(0))[0]


def eval_batch(items: list[list[int]]) -> Batch:
    lengths = torch.tensor([len(r) for r in items])
    L = int(lengths.max())
    x = torch.tensor([r + [0] * (L - len(r)) for r in items])
    zeros = torch.zeros(len(items), dtype=torch.long)
    return Batch(x, lengths, torch.zeros_like(x), zeros, zeros)



# ----------------------------------------------------------------------------------- all four
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_score_shapes(data, name):
    model = build(name)
    model.on_epoch_start(3)  # PRL past its warm-up: every term is computed
    out = model.loss(first_batch(data, model.layout))
    assert out["loss"].ndim == 0 and all(torch.isfinite(v) for v in out.values())
    model.eval()
    scores = model.scores(next(data.eval_batches("valid", 16)))
    assert scores.shape == (16, N_ITEMS + 1) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", NAMES)
def test_overfits_a_tiny_batch(data, name):
    params = dict(NO_DROPOUT[name])
    if name == "bert4rec":
        params["ft_ratio"] = 1.0  # always the last-item cloze: the next-item task, no random masks
    model = build(name, **params)
    batch = first_batch(data, model.layout, batch_size=24)
    # ReaRec's logits are divided by 0.07: a smaller step (at 1e-2 ERL's unbounded -KL term and
    # PRL's sharp softmax make the tiny-batch run oscillate)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3 if name.startswith("rearec") else 1e-2)
    model.train()
    first = last = None
    for _ in range(120):
        out = model.loss(batch)
        last = out.get("ce", out["loss"]).item()
        first = last if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        if model.layout == "sequence":
            has = batch.targets > 0
            hits = (model.encode(batch.items)[has] @ model.item_emb.weight.T).argmax(-1) == batch.targets[has]
        else:
            hits = model.scores(batch).argmax(-1) == batch.target
    assert last < 0.25 * first
    assert hits.float().mean() >= achievable_accuracy(batch) - 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_with_a_seed(data, name):
    batch = first_batch(data, build(name).layout)
    losses = []
    for _ in range(2):
        model = build(name, seed=7)
        model.on_epoch_start(3)
        torch.manual_seed(11)  # dropout, cloze masks and PRL's noise
        losses.append(model.loss(batch)["loss"].item())
    assert losses[0] == losses[1]
    other = build(name, seed=8)
    other.on_epoch_start(3)
    torch.manual_seed(11)
    assert other.loss(batch)["loss"].item() != losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_through_the_shared_trainer(data, name):
    from harness.train import TrainConfig, fit

    result = fit(build(name), data, TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN),
                 progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    for split in (result.valid, result.test):
        assert split and all(np.isfinite(v) for v in split.values())
    assert np.isfinite(result.curves[0]["loss"])


def test_study_files_load():
    from harness.studies import load_study_file

    root = Path(__file__).resolve().parents[1] / "studies"
    for name in NAMES:
        sf = load_study_file(root / f"{name}.toml")
        assert sf.model == name and sf.enqueue  # the paper's defaults run first


# ------------------------------------------------------------------------------------ GRU4Rec
def test_gru4rec_is_causal(data):
    """The state at position j is the state of the prefix alone: the "sequence" layout is exact."""
    model = build("gru4rec").eval()
    row = torch.tensor([[5, 3, 8, 2, 9, 4]])
    with torch.no_grad():
        full = model.encode(row)
        for j in range(1, 6):
            assert torch.allclose(full[0, j - 1], model.encode(row[:, :j])[0, -1], atol=1e-6)


# ----------------------------------------------------------------------------------- BERT4Rec
def test_bert4rec_masking_never_touches_padding():
    model = build("bert4rec", mask_ratio=0.9)
    seq = torch.tensor([[4, 7, 9, 0, 0], [1, 2, 3, 4, 5], [6, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 5, 1])
    seen = torch.zeros_like(seq, dtype=torch.bool)
    for _ in range(50):
        masked, labels = model.mask(seq, lengths)
        chosen = masked == model.mask_token
        assert not (chosen & (seq == 0)).any()
        assert torch.equal(masked[~chosen], seq[~chosen])
        assert torch.equal(labels, torch.where(chosen, seq, 0))
        seen |= chosen
    assert torch.equal(seen, seq > 0)  # every real position gets masked sometimes
    model.cfg.ft_ratio = 1.0  # the fine-tuning branch: only each row's last item
    masked, labels = model.mask(seq, lengths)
    assert torch.equal(labels.nonzero()[:, 1], lengths - 1)


def test_bert4rec_training_rows_hold_only_training_items(data):
    """Each row's cloze sequence (history + its own target) is a stretch of the user's training
    items, ending at a training target: the validation and test items never appear."""
    model = build("bert4rec")
    for batch in data.train_batches(model.layout, 64, np.random.default_rng(0)):
        seq, lengths = append_token(batch.items, batch.lengths, batch.target, MAX_LEN)
        assert (seq[torch.arange(seq.shape[0]), lengths - 1] == batch.target).all()
        for row, n, u in zip(seq.tolist(), lengths.tolist(), batch.users.tolist()):
            start = data.offsets[u]
            train = data.flat[start : start + data.train_len[u]].tolist()
            assert any(train[i : i + n] == row[:n] for i in range(len(train) - n + 1))


def test_bert4rec_dupe_factor_trains_each_row_that_many_times_with_fresh_masks(data):
    """dupe_factor D: layout "prefix*D", so an epoch holds D copies of every training row
    (the authors' masked duplicates), and the copies are masked independently."""
    from harness.train import TrainConfig, fit

    assert build("bert4rec").layout == "prefix" and BERT4Rec.layout == "prefix"
    model = build("bert4rec", dupe_factor=3)
    assert model.layout == "prefix*3"
    once = data.train_batches(build("bert4rec").layout, 64, np.random.default_rng(0))
    thrice = data.train_batches(model.layout, 64, np.random.default_rng(0))
    assert sum(b.size for b in thrice) == 3 * sum(b.size for b in once) == 3 * data.n_train_samples()
    model.cfg.ft_ratio = 0.0
    seq = torch.tensor([[4, 7, 9, 5, 2, 8]] * 3)
    masks = {tuple(model.mask(seq, torch.full((3,), 6))[1][i].tolist()) for i in range(3) for _ in range(5)}
    assert len(masks) > 1  # copies of one row in one batch get different masks
    result = fit(model, data, TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN), progress=False)
    assert result.epochs_run == 1 and np.isfinite(result.curves[0]["loss"])
    with pytest.raises(ValueError, match="dupe_factor"):
        build("bert4rec", dupe_factor=0)


def test_bert4rec_evaluation_appends_the_mask_token():
    torch.manual_seed(0)
    model = BERT4Rec(BERT4RecConfig(max_len=4), N_ITEMS).eval()
    batch = eval_batch([[3, 5], [1, 2, 3, 4]])  # the second history fills all 4 positions
    seq, lengths = append_token(batch.items, batch.lengths, torch.full((2,), model.mask_token), 4)
    assert seq.tolist() == [[3, 5, model.mask_token, 0], [2, 3, 4, model.mask_token]]
    assert lengths.tolist() == [3, 4]
    with torch.no_grad():
        scores = model.scores(batch)
        expected = model.logits(model.encode(seq)[torch.arange(2), lengths - 1])
    assert torch.allclose(scores, expected, atol=1e-6)
    assert model.item_emb.num_embeddings == N_ITEMS + 2 and scores.shape[1] == N_ITEMS + 1


# ------------------------------------------------------------------------------------- ReaRec
@pytest.mark.parametrize("cls,cfg_cls", [(ReaRecERL, ReaRecERLConfig), (ReaRecPRL, ReaRecPRLConfig)])
def test_rearec_reasoning_sees_only_the_history(cls, cfg_cls):
    """Padding after a row's last item (and other rows) never changes its reasoning or scores."""
    torch.manual_seed(0)
    model = cls(cfg_cls(max_len=MAX_LEN), N_ITEMS).eval()
    with torch.no_grad():
        alone = model.scores(eval_batch([[6, 1, 8]]))
        together = model.scores(eval_batch([[6, 1, 8], list(range(1, 16))]))
    assert torch.allclose(alone[0], together[0], atol=1e-5)


def test_rearec_cache_matches_full_recomputation():
    """Step k's output is a causal pass over [items, r_1..r_k], r_k = o_{k-1} + reasoning position
    (no item position), through the same input LayerNorm: the KV cache only saves work."""
    torch.manual_seed(0)
    model = ReaRecERL(ReaRecERLConfig(max_len=MAX_LEN, reason_steps=3), N_ITEMS).eval()
    items = torch.tensor([[4, 9, 2, 7]])
    with torch.no_grad():
        o, _ = model.reason(items, torch.tensor([4]))
        x = model.item_emb(items) + model.pos_emb(torch.arange(4))[None]
        for k in range(1, 4):
            x = torch.cat([x, (o[:, k - 1] + model.reason_pos_emb.weight[k - 1])[:, None]], dim=1)
            h = model.emb_ln(x)
            for block in model.blocks:
                h = block(h)
            assert torch.allclose(h[0, -1], o[0, k], atol=1e-5)
    assert o.shape == (1, 4, 64)


def _reason_by_full_passes(model, items, lengths):
    """ReaRec's step outputs the straightforward way: every row alone, every step a full causal
    pass over [history, r_1..r_k] through every block at every position."""
    K, rows = model.cfg.reason_steps, []
    for b in range(items.shape[0]):
        n = int(lengths[b])
        x = model.item_emb(items[b:b + 1, :n]) + model.pos_emb(torch.arange(n))[None]
        outs = []
        for k in range(K + 1):
            if k:
                x = torch.cat([x, (outs[-1] + model.reason_pos_emb.weight[k - 1])[:, None]], dim=1)
            h = model.emb_ln(x)
            for block in model.blocks:
                h = block(h)
            outs.append(h[:, -1])
        rows.append(torch.stack(outs, dim=1))
    return torch.cat(rows)


def test_rearec_reasoning_equals_full_passes_in_states_and_gradients():
    """With keys/values cached, a batch of padded rows of mixed lengths gives the step outputs
    and gradients of full passes, row by row."""
    torch.manual_seed(0)
    cfg = ReaRecERLConfig(max_len=MAX_LEN, reason_steps=2, dropout=0.0, attn_dropout=0.0, emb_dropout=0.0)
    model = ReaRecERL(cfg, N_ITEMS).train()
    items = torch.tensor([[4, 9, 2, 7, 3], [5, 1, 0, 0, 0], [8, 0, 0, 0, 0], [2, 6, 9, 0, 0]])
    lengths = torch.tensor([5, 2, 1, 3])
    params = [p for p in model.parameters()]
    o, _ = model.reason(items, lengths)
    r = torch.randn_like(o)  # a projection: post-LN outputs have a constant norm
    got = torch.autograd.grad((o * r).sum(), params, allow_unused=True)
    ref = _reason_by_full_passes(model, items, lengths)
    want = torch.autograd.grad((ref * r).sum(), params, allow_unused=True)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_erl_kl_term(data):
    batch = first_batch(data, "prefix")
    model = build("rearec-erl", seed=3)
    torch.manual_seed(5)
    out = model.loss(batch)
    assert set(out) == {"loss", "ce", "kl"} and torch.isfinite(out["kl"]) and out["kl"] >= 0
    assert torch.allclose(out["loss"].detach(), out["ce"] - model.cfg.kl_weight * out["kl"])
    out["loss"].backward()
    with_kl = model.blocks[0].attn.qkv.weight.grad.clone()

    plain = build("rearec-erl", seed=3, kl_weight=0.0)
    torch.manual_seed(5)
    out0 = plain.loss(batch)
    assert set(out0) == {"loss"} and torch.allclose(out0["loss"].detach(), out["ce"])
    out0["loss"].backward()
    assert not torch.allclose(plain.blocks[0].attn.qkv.weight.grad, with_kl)
    # pairwise_kl is the mean KL over ordered pairs of different steps, 0 for equal steps
    logits = torch.randn(2, 3, 7)
    p = F.softmax(logits, -1)
    manual = np.mean([(p[b, j] * (p[b, j].log() - p[b, i].log())).sum().item()
                      for b in range(2) for i in range(3) for j in range(3) if i != j])
    assert pairwise_kl(logits).item() == pytest.approx(manual, rel=1e-5)
    assert pairwise_kl(logits[:, :1].expand(2, 3, 7)).item() == pytest.approx(0.0, abs=1e-6)


def test_prl_progressive_temperatures_and_contrastive_warmup(data):
    batch = first_batch(data, "prefix")
    model = build("rearec-prl", seed=3, **NO_DROPOUT["rearec-prl"])
    cfg = model.cfg
    for epoch in (1, 2):  # warm-up: no noise, no InfoNCE
        model.on_epoch_start(epoch)
        assert set(model.loss(batch)) == {"loss", "ce", "pl"}
    out = model.loss(batch)
    with torch.no_grad():  # CE of o_k at temperature tau * alpha^(K-k), averaged over k < K
        o, _ = model.reason(batch.items, batch.lengths)
        logits = o @ model.item_emb.weight.T
        pl = np.mean([F.cross_entropy(logits[:, k] / (cfg.temperature * cfg.temp_scale ** (2 - k)),
                                      batch.target).item() for k in range(2)])
        ce = F.cross_entropy(logits[:, 2] / cfg.temperature, batch.target).item()
    assert out["pl"].item() == pytest.approx(pl, rel=1e-5) and out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert torch.allclose(out["loss"].detach(), out["ce"] + cfg.pl_weight * out["pl"])

    model.on_epoch_start(3)  # after warm-up: the noisy copy and its InfoNCE
    torch.manual_seed(0)
    out = model.loss(batch)
    assert set(out) == {"loss", "ce", "pl", "cl"} and torch.isfinite(out["cl"]) and out["cl"] > 0
    assert torch.allclose(out["loss"].detach(), out["ce"] + cfg.pl_weight * out["pl"] + cfg.cl_weight * out["cl"])
    model.zero_grad()
    out["loss"].backward()
    with_cl = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.cfg.cl_weight = 0.0  # the same model and epoch without the contrastive term
    assert not model.contrastive_active
    model.loss(batch)["loss"].backward()
    assert not torch.allclose(model.blocks[0].attn.qkv.weight.grad, with_cl)
