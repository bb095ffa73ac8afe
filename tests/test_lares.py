"""LARES: stage 1 (`lares-ssl`, models/lares.py) and stage 2 (`lares`, GRPO, models/lares_rl.py).

Stage 1: the port's defaults, shapes, the three loss terms, same-target partners from the whole
split, the step term's intermediate step, random depth and starting state, the recurrence,
causality (the "sequence" layout is exact), capacity, determinism, one trainer epoch.
Stage 2: advantage normalisation on a hand-made group, the pessimistic ranking reward, the
reward from the final step only, the GRPO loss and its gradient, the frozen reference
(bit-identical after training), shapes, capacity, determinism, and the stage-1 checkpoint
pre-trained once and shared through the cache like IGR-SR's LID. All tiny: seconds each."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from harness.data.split import Batch, LeaveOneOut
from models.lares import LARES, LARESConfig, align, pack
from models.lares_rl import (LARESGRPO, LARESGRPOConfig, group_advantages, grpo_loss, pessimistic_rank,
                             ranking_reward, rollout_terms, step_log_probs, target_log_probs)
from helpers import achievable_accuracy

N_ITEMS = 40
MAX_LEN = 20
NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0}
FAST = {"depth_sampling": "constant", "depth": 2}  # keeps capacity checks to a few seconds


@pytest.fixture(scope="module")
def data(small_split) -> LeaveOneOut:
    return small_split


def build(seed: int = 0, **params) -> LARES:
    torch.manual_seed(seed)
    spec = models.get("lares-ssl")
    return spec.build(spec.make_config(max_len=MAX_LEN, **params), N_ITEMS)


def build_grpo(seed: int = 0, stage1: LARES | None = None, **params) -> LARESGRPO:
    spec = models.get("lares")
    cfg = spec.make_config(max_len=MAX_LEN, **params)
    stage1 = build(seed, **{k: v for k, v in asdict(cfg.stage1()).items() if k != "max_len"}) if stage1 is None else stage1
    torch.manual_seed(seed)
    return spec.build(cfg, N_ITEMS, stage1=stage1)


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
    torch.manual_seed(seed)  # the same dropout masks, depths and starting states
    model.loss(batch)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in model.core.parameters()])


# ---------------------------------------------------------------------------------- stage 1
def test_registered_with_the_ports_defaults():
    ssl, full = models.get("lares-ssl"), models.get("lares")
    assert ssl.config_cls is LARESConfig and ssl.needs(ssl.make_config()) == ()
    assert full.config_cls is LARESGRPOConfig and full.needs(full.make_config()) == ("lares-stage1",)
    cfg = full.make_config()
    assert (cfg.pre_layers, cfg.core_layers, cfg.depth, cfg.depth_sampling) == (2, 2, 3, "poisson-lognormal")
    assert (cfg.state_std, cfg.state_scale, cfg.aggregate, cfg.similarity, cfg.temperature) == (1.0, 3.0, "add", "dot", 1.0)
    assert (cfg.traj_weight, cfg.step_weight, cfg.hidden, cfg.inner, cfg.heads) == (0.2, 0.1, 64, 256, 2)
    assert (cfg.group_size, cfg.reward_k, cfg.reward_metric, cfg.beta) == (4, 10, "recall", 1.0)
    assert cfg.stage1() == LARESConfig()  # stage 2's own fields are not stage 1's identity
    assert dataclasses.replace(cfg, beta=0.1, group_size=8).stage1() == cfg.stage1()
    for bad in ({"aggregate": "mul"}, {"depth_sampling": "uniform"}, {"similarity": "l2"}, {"depth": 0}):
        with pytest.raises(ValueError):
            build(**bad)


def test_loss_terms_and_score_shapes(data):
    model = build()
    model.on_epoch_start(1, data)
    batch = first_batch(data)
    torch.manual_seed(1)
    out = model.loss(batch)
    assert set(out) == {"loss", "ce", "traj", "step"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    cfg = model.cfg
    assert torch.allclose(out["loss"].detach(), out["ce"] + cfg.traj_weight * out["traj"] + cfg.step_weight * out["step"])
    with torch.no_grad():
        states = model.reason(model.pre_block(batch.items), 5)
    assert states.shape == (5, *batch.items.shape, cfg.hidden)
    model.eval()
    scores = model.scores(next(data.eval_batches("valid", 16)))
    assert scores.shape == (16, N_ITEMS + 1) and torch.isfinite(scores).all()


def test_terms_finite_in_every_variant(data):
    batch = first_batch(data)
    for params in ({"aggregate": "concat"}, {"similarity": "cos", "temperature": 0.07}, {"state_scale": 0.0},
                   {"depth_sampling": "constant", "depth": 1}):
        out = build(**params).loss(batch)
        assert all(torch.isfinite(v) for v in out.values()), params
    assert build(depth_sampling="constant", depth=1).loss(batch)["step"] == 0  # no intermediate step
    assert set(build(traj_weight=0.0, step_weight=0.0).loss(batch)) == {"loss", "ce"}
    assert set(build(traj_weight=0.0).loss(batch)) == {"loss", "ce", "step"}


def test_depth_drawn_per_forward_pass():
    model = build().train()
    torch.manual_seed(0)
    depths = np.array([model.sample_depth() for _ in range(4000)])
    assert depths.min() >= 1 and depths.max() <= 9  # 1 + Poisson(lognormal), at most 3 x depth
    assert abs(depths.mean() - 4.0) < 0.15  # the rate's mean is depth = 3, plus the 1
    assert len(set(depths)) > 5
    assert model.eval().sample_depth() == 3
    assert build(depth_sampling="constant").train().sample_depth() == 3


def test_starting_state_random_in_training_and_one_fixed_draw_in_evaluation():
    model = build()
    h = torch.zeros(3, 6, 64)
    model.train()
    a, b = model.initial_state(h), model.initial_state(h)
    assert not torch.equal(a, b) and a.abs().max() <= 9.0 + 1e-5  # 3 * N(0, 1) truncated at 3 std
    big = model.initial_state(torch.zeros(64, 50, 64))
    assert big.std().item() == pytest.approx(3 * 0.9866, rel=0.01)  # a truncated N(0, 1)'s std: 0.9866
    model.eval()
    e = model.initial_state(h)
    assert torch.equal(e, model.initial_state(h)) and torch.equal(e[0], e[2])  # per position, every row alike
    assert not torch.equal(e[0, 0], e[0, 1])
    assert torch.equal(model.initial_state(torch.zeros(1, 4, 64))[0], e[0, :4])  # position j's draw, any width
    assert not torch.equal(build(eval_state_seed=1).eval().initial_state(h), e)


def test_scores_deterministic_and_independent_of_the_batch():
    model = build(seed=7).eval()
    with torch.no_grad():
        together = model.scores(eval_batch([[3, 5, 9], [1, 2, 3, 4]]))
        alone = model.scores(eval_batch([[1, 2, 3, 4]]))
        assert torch.equal(together, model.scores(eval_batch([[3, 5, 9], [1, 2, 3, 4]])))
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_core_step_is_the_ports_recurrence():
    """T_i = C(LN(f(T_{i-1}, H))), f = (T + H) / 2 or a linear map of [T; H], from evaluation's T_0."""
    for aggregate in ("add", "concat"):
        model = build(aggregate=aggregate).eval()
        items = torch.tensor([[4, 9, 2, 7]])
        with torch.no_grad():
            h = model.pre_block(items)
            t = model.initial_state(h)
            for _ in range(3):
                x = (t + h) / 2 if aggregate == "add" else model.adapter(torch.cat([t, h], -1))
                x = model.core_ln(x)
                for block in model.core:
                    x = x + block.attn(block.ln1(x))
                    x = x + block.fc2(F.gelu(block.fc1(block.ln2(x))))  # pre-LN blocks
                t = x
            assert torch.allclose(model.encode(items), t, atol=1e-5)


def test_depth_matters_with_shared_weights():
    params = [sum(p.numel() for p in build(depth=k).parameters()) for k in (1, 3, 8)]
    assert params[0] == params[1] == params[2]  # one core block, reused
    model = build().eval()
    with torch.no_grad():
        h = model.pre_block(torch.tensor([[3, 5, 9, 1]]))
        t = model.reason(h, 5)
        assert torch.equal(model.encode(torch.tensor([[3, 5, 9, 1]])), t[2])  # evaluation: cfg.depth = 3
        for i in range(4):
            assert not torch.allclose(t[i], t[i + 1], atol=1e-4)


def test_causal_so_the_sequence_layout_is_exact():
    """The state at position j is the state of the prefix items[:j+1] alone."""
    model = build().eval()
    row = torch.tensor([[5, 3, 8, 2, 9, 4]])
    with torch.no_grad():
        full = model.encode(row)
        for j in range(1, 6):
            assert torch.allclose(full[0, j - 1], model.encode(row[:, :j])[0, -1], atol=1e-5)


def test_samples_of_a_sequence_batch_are_their_prefix_rows(data):
    batch = first_batch(data)
    has = batch.targets > 0
    s = LARES.sample_histories(batch, has)
    rows = set()
    prefix = data.train_rows("prefix")
    for st, n in zip(prefix.start, prefix.length):
        rows.add((tuple(data.flat[st:st + n]), int(data.flat[st + n])))
    assert len(s.target) == int(has.sum())
    for items, n, t in zip(s.items, s.lengths, s.target):
        assert (tuple(items[:n].tolist()), int(t)) in rows and items[n:].eq(0).all()


def test_partners_have_the_same_target_from_the_whole_split(data):
    """ICSRec's index: another training sample with the same target and a different history
    where one exists (most are outside the batch), else the sample itself."""
    model = build()
    model.on_epoch_start(1, data)
    batch = first_batch(data, batch_size=16)
    has = batch.targets > 0
    prefix = data.train_rows("prefix")
    by_target: dict[int, set] = {}
    for st, n in zip(prefix.start, prefix.length):
        by_target.setdefault(int(data.flat[st + n]), set()).add(tuple(data.flat[st:st + n]))
    own = LARES.sample_histories(batch, has)
    in_batch = {tuple(r[:n].tolist()) for r, n in zip(own.items, own.lengths)}
    torch.manual_seed(0)
    p_items, p_len = model.partners(batch, has)
    outside = 0
    for i in range(len(p_len)):
        mine = tuple(own.items[i, :own.lengths[i]].tolist())
        theirs = tuple(p_items[i, :p_len[i]].tolist())
        others = by_target[int(own.target[i])] - {mine}
        assert theirs in (others if others else {mine})
        outside += theirs not in in_batch
    assert outside > 0


def test_packed_partner_pass_is_the_padded_rows_pass():
    """Partners packed side by side give each sequence the state (and gradients) its own
    right-padded row gives, with dropout and the random start off to make both deterministic."""
    torch.manual_seed(0)
    cfg = LARESConfig(hidden=16, inner=32, dropout=0.0, attn_dropout=0.0, state_scale=0.0, max_len=20)
    model = LARES(cfg, 40).train()
    lengths = torch.tensor([20, 1, 7, 13, 3, 3, 19, 2, 8, 11] * 8)
    items = torch.randint(1, 41, (len(lengths), 20)) * (torch.arange(20)[None] < lengths[:, None])
    packed = pack(items, lengths)
    assert packed.items.shape[1] == 20 and packed.items.shape[0] < len(lengths) / 2  # dense
    assert int((packed.items > 0).sum()) == int(lengths.sum())
    assert torch.equal(packed.items[packed.last_row, packed.last_col], items[torch.arange(len(lengths)), lengths - 1])
    params = list(model.parameters())
    a = model.final_states(items, lengths, 3)
    ga = torch.autograd.grad(a.square().sum(), params, allow_unused=True)
    b = model.final_states_grouped(items, lengths, 3)
    gb = torch.autograd.grad(b.square().sum(), params, allow_unused=True)
    assert torch.allclose(a, b, atol=1e-5)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


def test_alignment_is_the_ports_symmetric_info_nce():
    torch.manual_seed(0)
    x, y, tau = torch.randn(5, 8), torch.randn(5, 8), 0.5
    labels = torch.arange(5)
    manual = (F.cross_entropy(x @ y.T / tau, labels) + F.cross_entropy(y @ x.T / tau, labels)) / 2
    assert align(x, y, tau).item() == pytest.approx(manual.item(), rel=1e-6)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    cos = (F.cross_entropy(xn @ yn.T / tau, labels) + F.cross_entropy(yn @ xn.T / tau, labels)) / 2
    assert align(x, y, tau, "cos").item() == pytest.approx(cos.item(), rel=1e-6)


def test_step_alignment_pairs_the_final_state_with_an_intermediate_one(data):
    """Depth 2: the only intermediate step is T_1 (never the final state with itself)."""
    model = build(traj_weight=0.0, depth_sampling="constant", depth=2, state_scale=0.0, **NO_DROPOUT)
    batch = first_batch(data)
    has = batch.targets > 0
    out = model.loss(batch)
    with torch.no_grad():
        steps = model.reason(model.pre_block(batch.items), 2)[:, has]
    assert out["step"].item() == pytest.approx(align(steps[1], steps[0], 1.0).item(), rel=1e-5)


@pytest.mark.parametrize("term", ["traj_weight", "step_weight"])
def test_alignment_weights_change_the_gradients(data, term):
    batch = first_batch(data)
    on = grads(build(seed=3, depth_sampling="constant"), batch)  # depth 3: a step pair to align
    off = grads(build(seed=3, depth_sampling="constant", **{term: 0.0}), batch)
    assert not torch.allclose(on, off)


def fit_batch(model, batch: Batch, steps: int, lr: float) -> list[dict]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    outs = []
    for _ in range(steps):
        out = model.loss(batch)
        outs.append({k: v.item() for k, v in out.items()})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return outs


@pytest.fixture(scope="module")
def fitted_stage1(data) -> tuple[LARES, Batch, list[dict]]:
    """A stage-1 model fitted to one tiny batch (no dropout, depth 2): 100 Adam steps."""
    batch = first_batch(data, batch_size=48)
    model = build(**NO_DROPOUT, **FAST)
    outs = fit_batch(model, batch, 100, 1e-2)
    return model.eval(), batch, outs


def test_stage1_overfits_a_tiny_batch(fitted_stage1):
    model, batch, outs = fitted_stage1
    assert outs[-1]["ce"] < 0.1 * outs[0]["ce"]
    with torch.no_grad():
        has = batch.targets > 0
        hits = (model.encode(batch.items)[has] @ model.item_emb.weight.T).argmax(-1) == batch.targets[has]
    # one sample of slack: evaluation starts from its one fixed draw of T_0, which no training
    # pass saw (trained on random starts, a seed decides whether 48 or 49 of these 50 land; both
    # the packed and the padded partner pass, tried over 4 seeds each)
    assert hits.float().mean() >= achievable_accuracy(batch) - 1 / len(hits) - 1e-6


def test_stage1_deterministic_with_a_seed(data):
    batch = first_batch(data)
    losses = []
    for _ in range(2):
        model = build(seed=7)
        torch.manual_seed(11)  # dropout, depths, starting states, partners
        losses.append(model.loss(batch)["loss"].item())
    assert losses[0] == losses[1]
    torch.manual_seed(11)
    assert build(seed=8).loss(batch)["loss"].item() != losses[0]


def test_one_epoch_through_the_shared_trainer(data):
    from harness.train import TrainConfig, fit

    model = build()
    result = fit(model, data, TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN, precision="fp32"),
                 progress=False)
    assert model._index is not None  # on_epoch_start indexed the split for partners
    assert result.epochs_run == 1 and result.best_epoch == 1
    for split in (result.valid, result.test):
        assert split and all(np.isfinite(v) for v in split.values())
    assert all(np.isfinite(result.curves[0][k]) for k in ("loss", "ce", "traj", "step"))


# ---------------------------------------------------------------------------------- stage 2
def test_advantages_normalised_within_each_group():
    """Rows: the G = 4 rollouts; columns: samples. (r - mean) / (unbiased std + eps)."""
    rewards = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    adv = group_advantages(rewards, eps=1e-4)
    # sample 0: mean 0.25, std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert torch.allclose(adv[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    assert torch.equal(adv[:, 1], torch.zeros(4))  # every rollout alike: no signal
    # sample 2: mean 0.5, std sqrt(2 * 0.25 / 3)
    std = (0.5 / 3) ** 0.5
    assert torch.allclose(adv[:, 2], torch.tensor([-0.5, 0.5, 0.0, 0.0]) / (std + 1e-4))
    assert torch.allclose(adv.sum(0), torch.zeros(3), atol=1e-6)


def test_ranking_reward_is_the_pessimistic_rank_of_the_target():
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 5.0],  # col 0 (padding) is never ranked
                           [0.0, 4.0, 3.0, 2.0, 1.0],
                           [0.0, 1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([2, 4, 3])  # ranks: 1 (tied with item 4: counts against), 3, 3 (all tied)
    assert ranking_reward(scores, target, 2, "recall").tolist() == [1.0, 0.0, 0.0]
    assert ranking_reward(scores, target, 4, "recall").tolist() == [1.0, 1.0, 1.0]
    ndcg = ranking_reward(scores, target, 4, "ndcg")
    assert torch.allclose(ndcg, 1 / torch.log2(torch.tensor([3.0, 5.0, 5.0])))
    assert ranking_reward(scores, torch.tensor([4, 1, 1]), 1, "recall").tolist() == [0.0, 1.0, 0.0]


def test_reward_from_the_final_step_only():
    model = build().eval()
    torch.manual_seed(0)
    steps = torch.randn(3, 6, 64)
    target = torch.tensor([1, 5, 9, 12, 20, 33])
    lp, reward = rollout_terms(model, steps, target, 10, "ndcg")
    assert lp.shape == (3, 6) and reward.shape == (6,)
    changed = steps.clone()
    changed[:2] = torch.randn(2, 6, 64) * 5  # other intermediate steps
    lp2, reward2 = rollout_terms(model, changed, target, 10, "ndcg")
    assert torch.equal(reward, reward2) and torch.equal(lp[2], lp2[2]) and not torch.allclose(lp[:2], lp2[:2])
    towards = steps.clone()
    towards[-1] = 50 * model.item_emb.weight[target].detach()  # the final state points at the target
    _, reward3 = rollout_terms(model, towards, target, 10, "ndcg")
    assert torch.equal(reward3, torch.ones(6)) and not torch.equal(reward, reward3)


def test_grpo_loss_value_and_gradient():
    """Token loss -(exp(lp - sg lp) A - beta KL), KL = exp(ref - lp) - (ref - lp) - 1, mean over
    each rollout's own steps, then rollouts and samples; d/d lp = (-A + beta (1 - exp(ref - lp)))
    / (T_g G N)."""
    torch.manual_seed(0)
    G, N, beta = 2, 3, 0.5
    lps = [torch.randn(T, N, requires_grad=True) for T in (1, 3)]  # rollouts of different depths
    refs = [lp.detach() + 0.1 * torch.randn_like(lp) for lp in lps]
    adv = torch.randn(G, N)
    loss, kl = grpo_loss(lps, refs, adv, beta)
    kls = [torch.exp(r - lp) - (r - lp) - 1 for lp, r in zip(lps, refs)]
    want = torch.stack([(-(adv[g] - beta * kls[g])).mean(0) for g in range(G)]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert kl.item() == pytest.approx(torch.stack([k.mean(0) for k in kls]).mean().item(), rel=1e-6)
    loss.backward()
    for g, (lp, r) in enumerate(zip(lps, refs)):
        expect = (-adv[g] + beta * (1 - torch.exp(r - lp.detach()))) / (lp.shape[0] * G * N)
        assert torch.allclose(lp.grad, expect, atol=1e-7)


def test_stage2_loss_and_score_shapes(data):
    model = build_grpo(group_size=3)
    batch = first_batch(data)
    out = model.loss(batch)
    assert set(out) == {"loss", "reward", "kl"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert 0 <= out["reward"] <= 1 and out["kl"] >= 0
    model.eval()
    scores = model.scores(next(data.eval_batches("valid", 16)))
    assert scores.shape == (16, N_ITEMS + 1) and torch.isfinite(scores).all()


def test_stage2_starts_from_stage1_and_checks_it():
    stage1 = build(seed=4)
    model = build_grpo(stage1=stage1)
    for part in (model.policy, model.reference):
        assert all(torch.equal(a, b) for a, b in zip(part.state_dict().values(), stage1.state_dict().values()))
    eb = eval_batch([[3, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model.eval().scores(eb), stage1.eval().scores(eb))
    spec = models.get("lares")
    with pytest.raises(ValueError, match="stage-1"):
        spec.build(spec.make_config(max_len=MAX_LEN), N_ITEMS)
    with pytest.raises(ValueError, match="another config"):
        spec.build(spec.make_config(max_len=MAX_LEN, depth=5), N_ITEMS, stage1=stage1)
    with pytest.raises(ValueError, match="group_size"):
        spec.build(spec.make_config(max_len=MAX_LEN, group_size=1), N_ITEMS, stage1=stage1)


def test_reference_frozen_bit_identical_after_training(data):
    from harness.train import TrainConfig, fit

    model = build_grpo(group_size=2, **FAST)
    before = {k: v.clone() for k, v in model.reference.state_dict().items()}
    policy_before = model.policy.core[0].fc1.weight.detach().clone()
    fit(model, data, TrainConfig(epochs=2, device="cpu", batch_size=64, max_len=MAX_LEN, precision="fp32"),
        progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.reference.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in model.reference.parameters())
    assert not model.reference.training  # no dropout in it, whatever the outer mode
    assert not torch.equal(policy_before, model.policy.core[0].fc1.weight.detach())


def test_both_stages_overfit_a_tiny_batch(fitted_stage1):
    """Stage 1 memorises the batch; stage 2 (the port's beta 1.0, hit@1 reward) keeps it. Stage 2
    alone does not fit a batch from scratch: its "action" is the target itself, whose gradient is
    larger in the rollouts that miss (negative advantage), so without the KL term the objective
    drives the target's probability down (models/lares_rl.py)."""
    stage1, batch, _ = fitted_stage1
    has = batch.targets > 0
    model = build_grpo(stage1=stage1, reward_k=1, **NO_DROPOUT, **FAST)
    outs = fit_batch(model, batch, 30, 1e-3)
    # the reward of random-start rollouts, averaged over the last 10 steps (a minimum over single
    # steps measures the rollouts' noise, not whether stage 2 keeps the fit)
    assert np.mean([o["reward"] for o in outs[-10:]]) >= achievable_accuracy(batch) - 0.05
    assert all(np.isfinite(o["loss"]) and o["kl"] >= 0 for o in outs)
    model.eval()
    with torch.no_grad():
        hits = (model.policy.encode(batch.items)[has] @ model.policy.item_emb.weight.T).argmax(-1) == batch.targets[has]
    assert hits.float().mean() >= achievable_accuracy(batch) - 0.05


@pytest.mark.parametrize("block_rows", [None, 3])
def test_target_log_probs_are_the_log_softmax_at_the_target(block_rows):
    """The fused log-probabilities, ranks and gradients are those of the plain computation."""
    torch.manual_seed(0)
    R, V, d = 11, N_ITEMS + 1, 8
    h = (2 * torch.randn(R, d)).requires_grad_()
    w = torch.randn(V, d).requires_grad_()
    target = torch.randint(1, V, (R,))
    target[0] = 0  # a column-0 target still gets its log-probability
    with torch.no_grad():  # a row whose target's probability underflows in fp32 (log-sum-exp path)
        target[1] = 4
        h[1] = 60 * (w[3] - w[4])
    g = torch.randn(R)
    lp, rank = target_log_probs(h, w, target, rank_from=7, block_rows=block_rows)
    (lp * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None
    z = h @ w.T
    want = z.log_softmax(1).gather(1, target[:, None]).squeeze(1)
    (want * g).sum().backward()
    assert torch.allclose(lp, want, atol=1e-6, rtol=1e-6) and lp[1] < -150
    assert torch.equal(rank, pessimistic_rank(z[7:].detach(), target[7:]))
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)
    with torch.no_grad():  # the reference's use: nothing kept for a backward
        lp2, rank2 = target_log_probs(h, w, target)
    assert torch.allclose(lp2, want, atol=1e-6) and rank2.numel() == 0


def straightforward_stage2_loss(model: LARESGRPO, batch: Batch) -> torch.Tensor:
    """Stage 2's loss as the port's trainer computes it: per rollout, the policy's steps, its
    plain (autograd) log-probabilities and the final step's scores, and the reference run again
    at that rollout's depth."""
    cfg = model.cfg
    has_target = batch.targets > 0
    target = batch.targets[has_target]
    lps, ref_lps, rewards = [], [], []
    for _ in range(cfg.group_size):
        depth = model.policy.sample_depth()
        steps = model.policy.reason(model.policy.pre_block(batch.items), depth)[:, has_target]
        lp, final = step_log_probs(model.policy, steps, target)
        with torch.no_grad():
            ref_steps = model.reference.reason(model.reference.pre_block(batch.items), depth)[:, has_target]
            ref_lps.append(step_log_probs(model.reference, ref_steps, target)[0])
        lps.append(lp)
        rewards.append(ranking_reward(final.detach(), target, cfg.reward_k, cfg.reward_metric))
    return grpo_loss(lps, ref_lps, group_advantages(torch.stack(rewards), cfg.adv_eps), cfg.beta)[0]


@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_stage2_loss_and_gradients_are_the_straightforward_ones(data, similarity):
    """One reference pass at the deepest rollout's depth and the fused log-probabilities give
    the loss and gradients of the per-rollout computation (the same random draws)."""
    model = build_grpo(seed=3, group_size=4, similarity=similarity, temperature=0.5)
    batch = first_batch(data)
    results = []
    for compute in (lambda: model.loss(batch)["loss"], lambda: straightforward_stage2_loss(model, batch)):
        model.zero_grad()
        torch.manual_seed(9)  # the same depths, dropout masks and starting states
        loss = compute()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.policy.parameters() if p.grad is not None]))
    (loss, grads_), (want, want_grads) = results
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-7)
    assert len(grads_) == len(want_grads) > 0
    for a, b in zip(grads_, want_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_stage2_deterministic_with_a_seed(data):
    batch = first_batch(data)
    values = []
    for _ in range(2):
        model = build_grpo(seed=7)
        torch.manual_seed(11)  # dropout, depths and starting states of the rollouts
        out = model.loss(batch)
        values.append((out["loss"].item(), out["reward"].item(), out["kl"].item()))
    assert values[0] == values[1]
    model = build_grpo(seed=7)
    torch.manual_seed(12)
    assert model.loss(batch)["kl"].item() != values[0][2]


# ------------------------------------------------------------------- the cached stage-1 checkpoint
def test_stage1_pretrained_once_shared_by_stage2_runs_and_equal_to_a_lares_ssl_run(data, tmp_path):
    from harness.runs import RunSpec, build_model
    from harness.train import TrainConfig, fit, seed_everything

    train = TrainConfig(epochs=1, device="cpu", batch_size=64, max_len=MAX_LEN, precision="fp32")
    spec = RunSpec(model="lares", dataset="small", train=train, cache_dir=tmp_path, lid_epochs=2,
                   params={"group_size": 2, **FAST})
    model, _, info = build_model(spec, data, progress=False)
    assert not info["cached"] and info["epochs_run"] == 2 and len(info["curves"]) == 2
    assert list(tmp_path.glob("lares-stage1/*.pt"))
    # what `harness train --model lares-ssl` with this seed and the stage-1 recipe gives
    seed_everything(train.seed)
    ssl = models.get("lares-ssl").build(models.get("lares-ssl").make_config(max_len=MAX_LEN, **FAST), N_ITEMS)
    ref = fit(ssl, data, dataclasses.replace(train, epochs=2, batch_size=256), progress=False)  # the defaults
    assert info["test"] == ref.test and info["valid"] == ref.valid
    assert all(torch.equal(a, b) for a, b in zip(model.reference.state_dict().values(), ssl.state_dict().values()))
    # stage 2's own parameters and trainer settings reuse it; a stage-1 parameter does not
    again = spec.with_values({"beta": 0.1, "lr": 3e-3, "group_size": 3})
    _, _, info2 = build_model(again, data, progress=False)
    assert info2["cached"] and info2["key"] == info["key"]
    _, _, info3 = build_model(spec.with_values({"step_weight": 0.3}), data, progress=False)
    assert not info3["cached"] and info3["key"] != info["key"]


def test_run_record_carries_the_stage1_info(tiny_file, tmp_path):
    from harness.runs import RunSpec, run
    from harness.train import TrainConfig

    train = TrainConfig(epochs=1, device="cpu", batch_size=8, max_len=MAX_LEN, precision="fp32")
    record = run(RunSpec(model="lares", dataset=str(tiny_file), train=train, cache_dir=tmp_path, lid_epochs=1,
                         params={"group_size": 2}), progress=False)
    assert record.lid is None and record.stage1["key"] and record.stage1["test"]
    assert "stage1" in record.to_json() and record.result["epochs_run"] == 1


# ---------------------------------------------------------------------------------- study files
def test_study_files_load_with_the_defaults_first():
    from harness.studies import load_study_file

    root = Path(__file__).resolve().parents[1] / "studies"
    ssl = load_study_file(root / "lares-ssl.toml")
    assert ssl.model == "lares-ssl" and ssl.enqueue
    defaults = asdict(LARESConfig())
    assert all(ssl.enqueue[0][k] == defaults[k] for k in ssl.enqueue[0] if k != "lr") and ssl.enqueue[0]["lr"] == 1e-3
    full = load_study_file(root / "lares.toml")
    assert full.model == "lares" and full.enqueue
    stage1_fields = {f.name for f in dataclasses.fields(LARESConfig)}
    assert not {p.name for p in full.space} & stage1_fields  # tuning stage 2 reuses one stage 1
    defaults = asdict(LARESGRPOConfig())
    assert all(full.enqueue[0][k] == defaults[k] for k in full.enqueue[0] if k != "lr")
