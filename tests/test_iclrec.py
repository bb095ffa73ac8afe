"""ICLRec: loss terms and shapes, capacity, the contrastive weights' effect on gradients,
per-epoch k-means intents, the vectorised augmentations, and one epoch through the trainer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models
from harness.data.split import Batch, LeaveOneOut
from models.iclrec import ICLRec, ICLRecConfig, _masked_block, concat_pool, mean_pool, nce
from helpers import achievable_accuracy

N_ITEMS = 40
MAX_LEN = 20
K = 8  # intents: the small split has 60 users
NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0}


@pytest.fixture(scope="module")
def data(small_split) -> LeaveOneOut:
    return small_split


def build(seed: int = 0, **params) -> ICLRec:
    torch.manual_seed(seed)
    spec = models.get("iclrec")
    params = {"num_intents": K, "kmeans_redo": 2, **params}
    return spec.build(spec.make_config(max_len=MAX_LEN, **params), N_ITEMS)


def first_batch(data: LeaveOneOut, batch_size: int = 32) -> Batch:
    return data.train_batches("sequence", batch_size, np.random.default_rng(0))[0]


def qkv_grad(model: ICLRec, batch: Batch, seed: int = 5) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(seed)
    model.loss(batch)["loss"].backward()
    return model.blocks[0].attn.qkv.weight.grad.clone()


def test_loss_terms_and_score_shapes(data):
    model = build()
    assert model.layout == "sequence" and isinstance(model, models.SequentialRecommender)
    model.on_epoch_start(1, data)
    out = model.loss(first_batch(data))
    assert set(out) == {"loss", "ce", "seq_cl", "intent_cl"}
    assert out["loss"].ndim == 0 and all(torch.isfinite(v) for v in out.values())
    assert out["seq_cl"] > 0 and out["intent_cl"] > 0
    cfg = model.cfg
    assert torch.allclose(out["loss"].detach(),
                          out["ce"] + cfg.cf_weight * out["seq_cl"] + cfg.intent_cf_weight * out["intent_cl"])
    model.eval()
    batch = next(data.eval_batches("valid", 16))
    scores = model.scores(batch)
    assert scores.shape == (16, N_ITEMS + 1) and torch.isfinite(scores).all()
    with torch.no_grad():
        h = model.encode(batch.items)[torch.arange(16), batch.lengths - 1]
    assert torch.allclose(scores, h @ model.item_emb.weight.T, atol=1e-5)


def test_overfits_a_tiny_batch(data):
    model = build(**NO_DROPOUT)
    model.on_epoch_start(1, data)
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


@pytest.mark.parametrize("weight", ["cf_weight", "intent_cf_weight"])
def test_contrastive_weights_change_the_gradients(data, weight):
    batch = first_batch(data)
    grads = {}
    for w in (0.0, 0.1):
        model = build(seed=3, **{weight: w})
        model.on_epoch_start(1, data)
        assert (model.centroids is not None) == (weight == "cf_weight" or w > 0)
        grads[w] = qkv_grad(model, batch)
    assert not torch.allclose(grads[0.0], grads[0.1])


def test_no_intent_term_before_clustering(data):
    model = build()
    model.on_epoch_start(1)  # no data (e.g. a unit test): nothing to cluster
    assert model.centroids is None and not model.intents_active
    out = model.loss(first_batch(data))
    assert out["intent_cl"].item() == 0.0 and out["seq_cl"] > 0
    warm = build(warm_up_epochs=1)
    warm.on_epoch_start(1, data)  # the code's epoch 0 < warm_up_epoches: no intents yet
    assert warm.centroids is None
    warm.on_epoch_start(2, data)
    assert warm.centroids is not None


def test_deterministic_with_a_seed(data):
    batch = first_batch(data)
    losses = []
    for _ in range(2):
        model = build(seed=7)
        model.on_epoch_start(1, data)
        torch.manual_seed(11)  # dropout and augmentations
        losses.append(model.loss(batch)["loss"].item())
    assert losses[0] == losses[1]
    other = build(seed=8)
    other.on_epoch_start(1, data)
    torch.manual_seed(11)
    assert other.loss(batch)["loss"].item() != losses[0]


def test_on_epoch_start_clusters_without_touching_the_global_rng(data):
    model = build()
    model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model.on_epoch_start(1, data)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(m.training for m in model.modules())
    assert model.centroids.shape == (K, model.cfg.hidden) and not model.centroids.requires_grad
    assert "centroids" not in dict(model.named_parameters()) and "centroids" not in model.state_dict()
    # the clustered rows: one per user with a training sample, its last <= max_len inputs
    reps = model.sequence_representations(data)
    assert reps.shape == (int((data.train_len > 1).sum()), model.cfg.hidden)
    again = build()
    again.on_epoch_start(1, data)
    assert torch.equal(again.centroids, model.centroids)  # seeded from the epoch
    model.eval()
    model.on_epoch_start(1, data)
    assert not model.training  # the mode it was called in is kept


def _rows(seed: int = 0, B: int = 200, L: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    # distinct ids per row, so an item's position can be told from its id
    items = torch.stack([torch.randperm(N_ITEMS, generator=g)[:L] + 1 for _ in range(B)])
    items = items.masked_fill(torch.arange(L)[None] >= lengths[:, None], 0)
    return items, lengths


def _kind(row: list[int], out: list[int], n: int, m: int, cfg: ICLRecConfig) -> str:
    """Which augmentation produced `out` (length m) from `row` (length n); fails if none."""
    if m == max(int(cfg.crop_rate * n), 1) and m < n or n == 1:
        starts = [s for s in range(n - m + 1) if row[s:s + m] == out]
        if starts:
            assert starts[0] <= n - int(cfg.crop_rate * n) - 1  # the code's start range
            return "crop"
    assert m == n
    if 0 in out:
        assert out.count(0) == int(cfg.mask_rate * n)
        assert all(o in (0, r) for o, r in zip(out, row))
        return "mask"
    changed = [j for j in range(n) if out[j] != row[j]]
    assert sorted(out) == sorted(row)
    if changed:
        assert changed[-1] - changed[0] < int(cfg.reorder_rate * n)
    return "reorder"


@pytest.mark.parametrize("kind", ["random", "crop", "mask", "reorder"])
def test_augmentations_keep_padding_and_items(kind):
    model = build(augmentation=kind)
    items, lengths = _rows()
    torch.manual_seed(0)
    out, out_len = model.augment(items, lengths)
    assert out.shape[0] == items.shape[0] and out.shape[1] == int(out_len.max())
    pos = torch.arange(out.shape[1])
    assert (out[pos[None] >= out_len[:, None]] == 0).all()  # padding stays at the end
    seen = set()
    for i in range(items.shape[0]):
        n, m = int(lengths[i]), int(out_len[i])
        row, aug = items[i, :n].tolist(), out[i, :m].tolist()
        if kind in ("crop", "reorder"):
            assert 0 not in aug  # every position stays a real item
        assert set(aug) - {0} <= set(row)  # only items of the row itself
        found = _kind(row, aug, n, m, model.cfg)
        seen.add(found)
        if kind != "random" and n >= 5:  # short rows can look like another kind (no-op reorder)
            assert found == kind
    if kind == "random":
        assert seen == {"crop", "mask", "reorder"}


def test_crop_and_reorder_sizes_follow_the_code():
    model = build(augmentation="crop")
    items, lengths = _rows(seed=1)
    torch.manual_seed(1)
    _, crop_len = model.augment(items, lengths)
    expected = torch.tensor([max(int(0.2 * n), 1) for n in lengths.tolist()])
    assert torch.equal(crop_len, expected)
    model.cfg.augmentation = "reorder"
    reordered = sum(model.augment(items, lengths)[0][i].tolist() != items[i].tolist() for i in range(len(items)))
    assert reordered > 0


def test_view_encoder_skips_masked_items():
    model = build().eval()
    items = torch.tensor([[5, 3, 8, 2, 0, 0], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        # no id 0 inside a row: the same as the causal encoder at every real position
        assert torch.allclose(model.encode_views(items)[0, :4], model.encode(items)[0, :4], atol=1e-5)
        assert torch.allclose(model.encode_views(items)[1], model.encode(items)[1], atol=1e-5)
        # id 0 inside a row (a masked item): causal attention without id-0 keys, self always kept
        masked = torch.tensor([[5, 0, 8, 2]])
        h = model.encode_views(masked)
        x = model.emb_drop(model.emb_ln(model.item_inputs(masked)))
        keep = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
        for block in model.blocks:
            x = _masked_block(block, x, keep[None, None])
        assert torch.allclose(h, x, atol=1e-6)


def test_pooling_and_nce():
    h = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    lengths = torch.tensor([2, 3])
    assert torch.allclose(mean_pool(h, lengths), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    flat = concat_pool(h, lengths, 4).view(2, 4, 2)  # aligned at the last item, zero padding
    assert torch.equal(flat[0], torch.stack([torch.zeros(2), torch.zeros(2), h[0, 0], h[0, 1]]))
    assert torch.equal(flat[1, 1:], h[1]) and (flat[1, 0] == 0).all()
    # NCE: a_i's positive is b_i among b_j and a_j (j != i), and symmetrically, dot / tau;
    # with labels (de-noise), rows sharing a label are no negatives of each other
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    tau = 0.5

    def manual(labels):
        terms = []
        for i in range(4):
            others = [j for j in range(4) if j != i and labels[j] != labels[i]]
            for x, y in ((a, b), (b, a)):
                pos = x[i] @ y[i] / tau
                neg = [x[i] @ y[j] / tau for j in others] + [x[i] @ x[j] / tau for j in others]
                terms.append(-(pos - torch.logsumexp(torch.stack([pos, *neg]), 0)))
        return torch.stack(terms).mean().item()

    assert nce(a, b, tau).item() == pytest.approx(manual([0, 1, 2, 3]), rel=1e-5)
    labels = [0, 0, 1, 2]
    assert nce(a, b, tau, torch.tensor(labels)).item() == pytest.approx(manual(labels), rel=1e-5)


def test_one_epoch_through_the_shared_trainer(data):
    from harness.train import TrainConfig, fit

    model = build()
    result = fit(model, data, TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN), progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    for split in (result.valid, result.test):
        assert split and all(np.isfinite(v) for v in split.values())
    row = result.curves[0]
    assert np.isfinite(row["loss"]) and row["intent_cl"] > 0 and row["seq_cl"] > 0
    assert model.centroids.shape == (K, 64)


def test_study_file_loads():
    from harness.studies import load_study_file

    sf = load_study_file(Path(__file__).resolve().parents[1] / "studies" / "iclrec.toml")
    assert sf.model == "iclrec" and sf.enqueue
    first = sf.enqueue[0]
    assert first["num_intents"] == 256 and first["cf_weight"] == 0.1 and first["intent_cf_weight"] == 0.1


def test_rejects_unknown_options():
    with pytest.raises(ValueError, match="augmentation"):
        ICLRec(ICLRecConfig(augmentation="insert"), N_ITEMS)
    with pytest.raises(ValueError, match="instance_representation"):
        ICLRec(ICLRecConfig(instance_representation="last"), N_ITEMS)
