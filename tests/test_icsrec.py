"""ICSRec (models/icsrec.py): shapes, capacity, its three terms and their gradients, same-target
partners, per-epoch intents and the RNG, one trainer epoch, the study file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from harness.data.split import Batch, LeaveOneOut
from models.base import last_position, pack
from models.icsrec import ICSRec, ICSRecConfig, nt_xent
from helpers import achievable_accuracy

N_ITEMS = 40
MAX_LEN = 20
NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0}
SMALL = {"intent_num": 8, "kmeans_redo": 2}  # keeps k-means cheap on one CPU thread


@pytest.fixture(scope="module")
def data(small_split) -> LeaveOneOut:
    return small_split


def build(seed: int = 0, **params) -> ICSRec:
    torch.manual_seed(seed)
    spec = models.get("icsrec")
    return spec.build(spec.make_config(max_len=MAX_LEN, **{**SMALL, **params}), N_ITEMS)


def first_batch(data: LeaveOneOut, batch_size: int = 32) -> Batch:
    return data.train_batches("prefix", batch_size, np.random.default_rng(0))[0]


def histories(data: LeaveOneOut) -> tuple[list[tuple], np.ndarray]:
    """Every prefix sample's history (as a tuple) and target."""
    rows = data.train_rows("prefix")
    hist = [tuple(data.flat[s:s + n]) for s, n in zip(rows.start, rows.length)]
    return hist, data.flat[rows.start + rows.length]


def test_registered_with_prefix_layout_and_defaults():
    spec = models.get("icsrec")
    cfg = spec.make_config()
    assert spec.config_cls is ICSRecConfig and ICSRec.layout == "prefix"
    assert (cfg.intent_num, cfg.lambda_0, cfg.beta_0, cfg.temperature, cfg.sim, cfg.f_neg) == (256, 0.3, 0.1, 1.0, "dot", True)
    with pytest.raises(ValueError, match="sim"):
        ICSRec(ICSRecConfig(sim="l2"), N_ITEMS)


def test_loss_and_score_shapes(data):
    model = build()
    out = model.loss(first_batch(data))
    assert set(out) == {"loss", "ce", "coarse_cl", "fine_cl"}
    assert out["loss"].ndim == 0 and all(torch.isfinite(v) for v in out.values())
    assert out["fine_cl"] == 0  # no intents before on_epoch_start
    model.eval()
    scores = model.scores(next(data.eval_batches("valid", 16)))
    assert scores.shape == (16, N_ITEMS + 1) and torch.isfinite(scores).all()


def test_every_term_after_an_epoch_start(data):
    model = build()
    model.train()
    model.on_epoch_start(1, data)
    out = model.loss(first_batch(data))
    assert all(torch.isfinite(v) for v in out.values()) and out["coarse_cl"] > 0 and out["fine_cl"] > 0
    cfg = model.cfg
    assert torch.allclose(out["loss"].detach(), out["ce"] + cfg.lambda_0 * out["coarse_cl"] + cfg.beta_0 * out["fine_cl"])


def test_overfits_a_tiny_batch(data):
    model = build(**NO_DROPOUT)
    batch = first_batch(data, batch_size=24)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = last = None
    for _ in range(120):
        out = model.loss(batch)
        last = out["ce"].item()
        first = last if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        hits = model.scores(batch).argmax(-1) == batch.target
    assert last < 0.25 * first
    assert hits.float().mean() >= achievable_accuracy(batch) - 1e-6


def _grad(model: ICSRec, batch: Batch, seed: int = 5) -> tuple[dict, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    out = model.loss(batch)
    out["loss"].backward()
    return out, model.blocks[0].attn.qkv.weight.grad.clone()


def test_contrastive_weights_change_the_gradients(data):
    """Without dropout the CE gradient does not depend on the RNG: weight 0 gives exactly the
    CE gradient, a positive weight on either term changes it."""
    batch = first_batch(data)
    grads = {}
    for name, weights in {"none": (0.0, 0.0), "coarse": (0.3, 0.0), "fine": (0.0, 0.1)}.items():
        model = build(seed=3, lambda_0=weights[0], beta_0=weights[1], **NO_DROPOUT)
        model.on_epoch_start(1, data)
        out, grads[name] = _grad(model, batch)
        if name == "none":
            assert torch.equal(out["loss"].detach(), out["ce"]) and model.centroids is None  # no k-means
            plain = build(seed=3, **NO_DROPOUT)
            plain.zero_grad()
            F.cross_entropy(plain.scores(batch), batch.target).backward()
            assert torch.allclose(grads[name], plain.blocks[0].attn.qkv.weight.grad, atol=1e-6)
    assert not torch.allclose(grads["none"], grads["coarse"])
    assert not torch.allclose(grads["none"], grads["fine"])


def test_deterministic_with_a_seed(data):
    batch = first_batch(data)
    losses = []
    for _ in range(2):
        model = build(seed=7)
        model.on_epoch_start(1, data)
        torch.manual_seed(11)  # dropout and partner draws
        losses.append(model.loss(batch)["loss"].item())
    assert losses[0] == losses[1]
    other = build(seed=8)
    other.on_epoch_start(1, data)
    torch.manual_seed(11)
    assert other.loss(batch)["loss"].item() != losses[0]


def test_partners_share_the_target_and_differ_in_history(data):
    model = build()
    model.on_epoch_start(1, data)
    hist, targets = histories(data)
    by_target: dict[int, set] = {}
    for h, t in zip(hist, targets):
        by_target.setdefault(int(t), set()).add(h)
    seen_partners: dict[tuple, set] = {}
    for seed, batch in enumerate(data.train_batches("prefix", 64, np.random.default_rng(1))):
        torch.manual_seed(seed)
        items, lengths, sample = model.partners(batch)
        assert items.shape[0] == batch.size and (lengths >= 1).all()
        for i in range(batch.size):
            own = tuple(batch.items[i, : batch.lengths[i]].tolist())
            mine = tuple(items[i, : lengths[i]].tolist())
            assert not items[i, lengths[i]:].any()  # right-padded with 0
            t = int(batch.target[i])
            if sample[i] >= 0:
                s = int(sample[i])
                assert targets[s] == t and hist[s] == mine and mine != own
                seen_partners.setdefault((own, t), set()).add(s)
            else:  # its own partner only when no other history leads to this target
                assert mine == own and by_target[t] == {own}
    assert any(len(p) > 1 for p in seen_partners.values())  # a draw, not a fixed partner


def test_partners_skip_identical_histories():
    """A hand-made split: a row is its own partner when every sample with its target has its
    history (another user's identical history is not a partner, as in the code)."""
    from harness.data.sequences import SequenceData

    seqs = [[1, 2, 3, 4, 30, 31], [7, 2, 3, 9, 32, 33], [1, 2, 3, 8, 34, 35], [20, 21, 22, 36, 37],
            [20, 21, 23, 38, 39]]
    flat = np.concatenate(seqs).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(q) for q in seqs])]).astype(np.int64)
    split = LeaveOneOut(SequenceData(items=flat, offsets=offsets, user_ids=np.arange(1, 6), n_items=N_ITEMS),
                        max_len=MAX_LEN)
    hist, targets = histories(split)
    model = build()
    model.on_epoch_start(1, split)
    batch = split.train_batches("prefix", 64, np.random.default_rng(0))[0]
    assert batch.size == len(hist) == 13
    for seed in range(5):
        torch.manual_seed(seed)
        items, lengths, sample = model.partners(batch)
        for i in range(batch.size):
            own, t = tuple(batch.items[i, : batch.lengths[i]].tolist()), int(batch.target[i])
            expected = {((1,), 2): (7,), ((7,), 2): (1,), ((1, 2), 3): (7, 2), ((7, 2), 3): (1, 2)}.get((own, t))
            mine = tuple(items[i, : lengths[i]].tolist())
            if expected is None:  # targets 4, 9, 8, 22, 23 (one history) and 21 (two users, one history)
                assert sample[i] == -1 and mine == own
            else:
                assert mine == expected and targets[int(sample[i])] == t and hist[int(sample[i])] == expected


def test_partners_are_drawn_uniformly_among_the_others(data):
    """For one row, every same-target sample with another history is drawn, about equally often."""
    model = build()
    model.on_epoch_start(1, data)
    hist, targets = histories(data)
    counts = np.bincount(targets)
    s = int(np.flatnonzero(counts[targets] >= 4)[0])
    n = 400
    items = torch.tensor([list(hist[s])] * n)
    batch = Batch(items, torch.full((n,), len(hist[s])), torch.zeros_like(items),
                  torch.full((n,), int(targets[s])), torch.zeros(n, dtype=torch.long))
    torch.manual_seed(0)
    _, _, sample = model.partners(batch)
    others = {i for i in np.flatnonzero(targets == targets[s]) if hist[i] != hist[s]}
    drawn = np.bincount(sample.numpy(), minlength=len(targets))
    assert set(np.flatnonzero(drawn)) == others
    assert drawn[list(others)].min() > n / len(others) / 3


def test_in_batch_partners_without_a_split(data):
    model = build()
    batch = first_batch(data, 64)
    torch.manual_seed(0)
    items, lengths, row = model.partners(batch)
    for i in range(batch.size):
        own = batch.items[i, : batch.lengths[i]].tolist()
        if row[i] >= 0:
            j = int(row[i])
            assert batch.target[j] == batch.target[i] and items[i, : lengths[i]].tolist() != own
            assert torch.equal(items[i], batch.items[j])
        else:
            assert items[i, : lengths[i]].tolist() == own
            assert not any(batch.target[j] == batch.target[i] and batch.items[j, : batch.lengths[j]].tolist() != own
                           for j in range(batch.size))
    assert (row >= 0).any() and (row < 0).any()


def test_epoch_start_fills_centroids_and_keeps_the_rng(data):
    model = build()
    model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model.on_epoch_start(1, data)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert model.centroids.shape == (8, 64) and torch.isfinite(model.centroids).all()
    assert torch.allclose(model.intents.norm(dim=1), torch.ones(8))
    first = model.centroids.clone()
    model.on_epoch_start(2, data)  # same weights, same seed: the same intents
    assert torch.equal(first, model.centroids)
    model.eval()
    model.on_epoch_start(3, data)
    assert not model.training


def test_nt_xent_false_negative_mask():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    distinct = torch.arange(4)
    assert torch.allclose(nt_xent(a, b, 1.0), nt_xent(a, b, 1.0, labels=distinct))
    # labels [0, 0, 1, 2]: rows 0 and 1 (and their counterparts) are not each other's negatives
    z = torch.cat([a, b])
    s = z @ z.T
    manual = []
    lab = torch.tensor([0, 0, 1, 2]).repeat(2)
    for i in range(8):
        pos = s[i, (i + 4) % 8]
        neg = s[i][lab != lab[i]]
        manual.append(-(pos - torch.logsumexp(torch.cat([pos[None], neg]), 0)))
    assert torch.allclose(nt_xent(a, b, 1.0, labels=torch.tensor([0, 0, 1, 2])), torch.stack(manual).mean())
    cos = nt_xent(a, b, 0.5, sim="cos")
    assert torch.allclose(cos, nt_xent(F.normalize(a, dim=1), F.normalize(b, dim=1), 0.5))


def test_positions_count_from_the_last_item():
    """As the code's left padding: the last item sits at position max_len - 1, and padding after
    a row (or a longer row beside it) never changes its score."""
    model = build().eval()
    items = torch.tensor([[6, 1, 8]])
    with torch.no_grad():
        x = model.item_emb(items) + model.pos_emb(torch.arange(MAX_LEN - 3, MAX_LEN))[None]
        h = model.emb_ln(x)
        for block in model.blocks:
            h = block(h)
        assert torch.allclose(model.user_vector(items, torch.tensor([3]))[0], h[0, -1], atol=1e-5)
        padded = torch.tensor([[6, 1, 8, 0, 0, 0], list(range(1, 7))])
        assert torch.allclose(model.user_vector(padded, torch.tensor([3, 6]))[0], h[0, -1], atol=1e-5)


def test_one_epoch_through_the_shared_trainer(data):
    from harness.train import TrainConfig, fit

    result = fit(build(), data, TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN), progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    for split in (result.valid, result.test):
        assert split and all(np.isfinite(v) for v in split.values())
    row = result.curves[0]
    assert all(np.isfinite(row[k]) for k in ("loss", "ce", "coarse_cl", "fine_cl")) and row["fine_cl"] > 0


def test_study_file_loads():
    from harness.studies import load_study_file

    sf = load_study_file(Path(__file__).resolve().parents[1] / "studies" / "icsrec.toml")
    assert sf.model == "icsrec"
    assert sf.enqueue[0] == {"intent_num": 256, "lambda_0": 0.3, "beta_0": 0.1, "lr": 1e-3}
    assert {p.name for p in sf.space} == {"intent_num", "lambda_0", "beta_0", "lr"}


def test_packed_rows_are_rounded_up_under_cpu_bf16(data):
    """Under a CPU bf16 autocast the packed row count is a multiple of 8 (oneDNN compiles a kernel
    per matmul shape; unrounded, nearly every batch had a new one): the extra rows hold padding
    alone, every sequence keeps its place, and the states are those of the unrounded pack."""
    model = build().eval()
    rows = data.train_rows("prefix")
    batch = data._train_batch(rows, np.random.default_rng(2).permutation(len(rows))[:37])
    items, lengths = batch.items, batch.lengths
    plain = pack(items, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = pack(items, lengths)
    R = plain.items.shape[0]
    assert rounded.items.shape[0] % 8 == 0 and rounded.items.shape[0] >= R
    assert rounded.items.shape[0] > R  # this batch needs extra rows, so the test checks them
    for name in ("items", "positions", "lengths", "mask"):
        a, b = getattr(plain, name), getattr(rounded, name)
        assert torch.equal(b[:R], a), name
    assert not rounded.items[R:].any() and not rounded.lengths[R:].any()
    assert torch.equal(rounded.mask[R:, 0], torch.eye(items.shape[1], dtype=torch.bool).expand(len(rounded.mask) - R, -1, -1))
    assert torch.equal(rounded.last_row, plain.last_row) and torch.equal(rounded.last_col, plain.last_col)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.last_states(items, lengths).float()
        expected = last_position(model.encode(items, lengths), lengths).float()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_length_grouped_states_equal_one_padded_pass(data):
    """The training views are encoded in groups of similar length (the partners' lengths are
    unrelated to the batch's); the states must be those of one padded pass."""
    model = build().eval()
    rows = data.train_rows("prefix")
    batch = data._train_batch(rows, np.random.default_rng(0).permutation(len(rows))[:48])  # mixed lengths
    items, lengths = batch.items, batch.lengths
    assert lengths.min() < items.shape[1]  # some rows are padded, so the grouping cuts something
    with torch.no_grad():
        torch.testing.assert_close(model.last_states_by_length(items, lengths), model.user_vector(items, lengths))


def test_packed_states_and_gradients_equal_one_padded_pass(data):
    """The training views are encoded packed side by side (`models.base.pack`): the same states
    and gradients as one padded pass, positions counted from each row's own last item."""
    model = build(dropout=0.0, attn_dropout=0.0).train()
    rows = data.train_rows("prefix")
    batch = data._train_batch(rows, np.random.default_rng(1).permutation(len(rows))[:96])  # mixed lengths
    items, lengths = batch.items, batch.lengths
    params = list(model.parameters())
    a = model.last_states(items, lengths)
    r = torch.randn_like(a)  # a projection: post-LN states have a constant norm, a sum of squares no gradient
    ga = torch.autograd.grad((a * r).sum(), params, allow_unused=True)
    b = model.user_vector(items, lengths)
    gb = torch.autograd.grad((b * r).sum(), params, allow_unused=True)
    # the reference: the full pass (every position through every block), read at the last item
    c = last_position(model.encode(items, lengths), lengths)
    gc = torch.autograd.grad((c * r).sum(), params, allow_unused=True)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)
    for grads in (ga, gb):
        for x, y in zip(grads, gc):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
