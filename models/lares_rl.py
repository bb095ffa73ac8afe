"""LARES stage 2 (`lares`): GRPO post-training of the stage-1 model (models/lares.py), as the
port by the authors' lab does it (RUCAIBox/RecBole3.0: its lares `trainer.py`, `_run_rl`,
`_rl_compute_loss`, `_compute_advantages`, and the yaml's RL settings). The code is this
project's own.

What it is:
- Starts from the stage-1 checkpoint: `lares-ssl` trained to early stop with its own recipe
  (the trainer's defaults, up to `--lid-epochs`, the run's seed and precision). The harness
  pre-trains it once and caches it under a key of the stage-1 config and the training data
  (harness/cache.py), as IGR-SR's LID encoder, so tuning stage 2 (its weights, lr) reuses one
  stage-1 run. `policy` gets the stage-1 weights and is trained; `reference` is a frozen copy of
  them (no gradients, always in eval mode: no dropout, evaluation's fixed starting state).
- Per batch, G = `group_size` = 4 rollouts of the policy, each a full forward pass with its own
  random depth, starting state and dropout (training mode). The reference runs at each
  rollout's depth.
- Reward, from the final step only: the target's ranking among all items by the final state's
  scores: hit@k ("recall", the port's yaml) or NDCG@k ("ndcg"), k = `reward_k` = 10. The rank
  is the harness's pessimistic one (ties count against the target), column 0 never ranked.
- Advantage per sample and rollout: (r - mean of the sample's G rewards) / (their std + eps),
  std unbiased as torch's (the port), eps = `adv_eps` = 1e-4.
- Per step t of a rollout, lp_t = log softmax(scores at step t)[target] (all items, as the CE),
  and the same for the reference, ref_t. Token loss -(exp(lp_t - sg(lp_t)) * A - beta * KL_t),
  KL_t = exp(ref_t - lp_t) - (ref_t - lp_t) - 1 (the k3 estimator), averaged over the rollout's
  own steps, then over rollouts and samples; beta = 1.0 (the port's yaml). The ratio is 1 in
  value, so the gradient is A * grad lp_t: every step's target probability moves with the
  rollout's advantage, and the KL term holds it near the reference's.
- The same trainer, early stopping and ranking as every model: this is just `loss(batch)`.
  As in the port, stage 2's first evaluation is after its first epoch: the stage-1 checkpoint
  itself is not a candidate for stage 2's best epoch.

A property of this objective worth knowing: the "action" whose log-probability is pushed is
the target itself, not a sampled item, and its gradient (1 - p) is larger in the rollouts that
missed (negative advantage) than in those that hit. The advantages sum to 0 over a group, but
these gradients do not, so the policy term alone lowers the target's probability: with beta = 0
a tiny batch's hit rate falls from ~0.9 to ~0 within a few dozen Adam steps (tests: stage 2
keeps a fitted batch at beta 1.0). The KL term is what holds it; with beta = 0 no KL is
computed at all (an overflowed KL times 0 would be nan).

Where this differs from the port, and why:
- Layout "sequence" (one row per user, all its prefixes at once), as stage 1: exact for this
  causal model, and every sample still gets its own reward and advantage. A rollout's depth is
  one draw for the whole batch, as in the port.
- The reference starts from evaluation's fixed state (the port's draws a random one, its
  "normal" start being random in evaluation too): the reference is the stage-1 model exactly as
  it ranks. Dropout off in it, as the port's `ref_model.eval()`.
- Log-probabilities and rewards are computed in fp32 outside any autocast: the ratio and KL are
  differences of nearly equal log-probabilities, and bf16 scores would tie in the top 10.
- Adam (the shared trainer), not AdamW; history length 50 (the protocol).

How it is computed (the same numbers as the straightforward way, to fp32 rounding; tested):
- The reference runs once per batch, at the deepest of the G rollouts' depths, and each
  rollout reads its leading steps. Exact: in eval mode the reference has no dropout and one
  fixed starting state, so its step t is the same for every rollout, whatever the depth.
- Target log-probabilities come from `target_log_probs`: the (steps x samples x items) fp32
  logits are made block by block, each block's softmax (the log-probability is the log of its
  target entry, or from the log-sum-exp where that underflows) and (for the final step) the
  target's rank taken while it is in cache, so they never go through autograd (whose
  logsumexp kept the logits, re-read them and wrote a second matrix in its backward). The policy
  keeps the softmax for its backward; the reference keeps nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from models.base import NON_NEGATIVE, POSITIVE, OneOf, Range, SequentialRecommender, at_least
from models.lares import LARES, LARESConfig
from models.losses import _block_rows, _target_nll

REWARDS = ("recall", "ndcg")


@dataclass
class LARESGRPOConfig(LARESConfig):
    """Stage 1's fields (they define the stage-1 model this run starts from) + stage 2's."""

    group_size: int = 4  # G rollouts per batch
    reward_k: int = 10
    reward_metric: str = "recall"  # hit@k | "ndcg" (NDCG@k)
    beta: float = 1.0  # weight of the KL to the reference
    adv_eps: float = 1e-4

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "group_size": at_least(2), "reward_k": at_least(1), "reward_metric": OneOf(REWARDS), "beta": NON_NEGATIVE,
        "adv_eps": POSITIVE}  # advantages divide by the group's std + adv_eps

    def stage1(self) -> LARESConfig:
        """The stage-1 (`lares-ssl`) config inside this one: the pre-trained model's identity."""
        return LARESConfig(**{f.name: getattr(self, f.name) for f in fields(LARESConfig)})


def pessimistic_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target's 0-based rank among the items (column 0 is padding, never ranked), ties
    counted against it."""
    s = scores.float()
    return (s[:, 1:] >= s.gather(1, target[:, None])).sum(1) - 1


def rank_reward(rank: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """hit@k = [r < k], NDCG@k = [r < k] / log2(r + 2) of 0-based ranks r."""
    hit = rank < k
    if metric == "recall":
        return hit.float()
    return torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), 0.0)


def ranking_reward(scores: torch.Tensor, target: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """Reward per row from scores (R, n_items + 1): the target's pessimistic rank, as hit@k or
    NDCG@k (`rank_reward`)."""
    return rank_reward(pessimistic_rank(scores, target), k, metric)


class _TargetLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target, rank_from, block_rows):
        R, V = h.shape[0], w.shape[0]
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        lp = torch.empty(R, dtype=torch.float32, device=h.device)
        rank = torch.empty(R - rank_from, dtype=torch.long, device=h.device)
        probs = torch.empty(R, V, dtype=torch.float32, device=h.device) if keep else None
        rows = _block_rows(R, V, block_rows)  # the fused CE's row blocks: a block's softmax stays in cache
        for r0 in range(0, R, rows):
            r1 = min(R, r0 + rows)
            z = h[r0:r1] @ w.T
            tr = target[r0:r1]
            if r1 > rank_from:  # the final step's rows: the target's pessimistic rank
                a = max(r0, rank_from)
                zt = z[a - r0:].gather(1, tr[a - r0:, None])
                rank[a - rank_from:r1 - rank_from] = (z[a - r0:, 1:] >= zt).sum(1) - 1
            # one exp pass: the softmax the backward needs, its target entry the log-probability
            p = torch.softmax(z, 1, out=probs[r0:r1]) if keep else torch.softmax(z, 1)
            lp[r0:r1] = -_target_nll(p[torch.arange(r1 - r0, device=h.device), tr], z, tr)
        if keep:
            ctx.save_for_backward(h, w, target)
            ctx.probs = probs
        ctx.mark_non_differentiable(rank)
        return lp, rank

    @staticmethod
    def backward(ctx, grad_lp, _grad_rank):
        h, w, target = ctx.saved_tensors
        # d lp_r / d z_r = onehot(target_r) - softmax(z_r), times the row's incoming gradient;
        # written over the kept softmax (a backward runs once: the graph is not retained)
        g, ctx.probs = ctx.probs, None
        g.mul_(-grad_lp[:, None])
        g[torch.arange(g.shape[0], device=g.device), target] += grad_lp
        grad_h = g @ w if ctx.needs_input_grad[0] else None
        grad_w = g.T @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def target_log_probs(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, rank_from: int | None = None,
                     block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h @ w.T)[target] per row, (R,), in fp32 outside any autocast, and the
    pessimistic rank of the target (`pessimistic_rank`) for rows `rank_from`.. (none by default):
    what `(z.gather(1, target) - z.logsumexp(1), pessimistic_rank(z[rank_from:], ...))` of
    `z = h @ w.T` gives, without the (R x items) logits in autograd (see the module docstring).
    `block_rows` fixes the row block (tests)."""
    R = h.shape[0]
    rank_from = R if rank_from is None else rank_from
    with torch.autocast(h.device.type, enabled=False):
        return _TargetLogProbs.apply(h.float(), w.float(), target, rank_from, block_rows)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(G, N) rewards of G rollouts of N samples -> (r - group mean) / (group std + eps)."""
    return (rewards - rewards.mean(0)) / (rewards.std(0) + eps)


def step_log_probs(model: LARES, steps: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For states (T, N, d) of one rollout: the target's log-probability at every step (T, N)
    and the final step's scores (N, n_items + 1), fp32 outside any autocast."""
    with torch.autocast(steps.device.type, enabled=False):
        h, w = model.output(steps.float())
        z = h @ w.float().T  # (T, N, n_items + 1)
        lp = z.gather(2, target.expand(z.shape[0], -1)[..., None]).squeeze(2) - torch.logsumexp(z, dim=2)
    return lp, z[-1]


def step_terms(model: LARES, steps: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`step_log_probs` fused (`target_log_probs`): (T, N) target log-probabilities and the
    target's pessimistic rank by the final step's scores (N,), instead of those scores."""
    T, N, d = steps.shape
    with torch.autocast(steps.device.type, enabled=False):
        h, w = model.output(steps.float())
        lp, rank = target_log_probs(h.reshape(T * N, -1), w, target.repeat(T), rank_from=(T - 1) * N)
    return lp.view(T, N), rank


def rollout_terms(model: LARES, steps: torch.Tensor, target: torch.Tensor, k: int,
                  metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-step target log-probabilities (T, N), reward (N,) from the final step's ranking)."""
    lp, rank = step_terms(model, steps, target)
    return lp, rank_reward(rank, k, metric)


def grpo_loss(lps: list[torch.Tensor], ref_lps: list[torch.Tensor], adv: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO loss over G rollouts (each its own number of steps): lps[g], ref_lps[g] (T_g, N),
    advantages (G, N). Returns (loss, mean KL), both averaged over each rollout's own steps,
    then over rollouts and samples."""
    losses, kls = [], []
    for g, (lp, ref) in enumerate(zip(lps, ref_lps)):
        d = ref - lp
        kl = torch.exp(d) - d - 1
        token = -torch.exp(lp - lp.detach()) * adv[g]
        if beta > 0:  # beta = 0: no KL term at all (0 * an overflowed KL would be nan)
            token = token + beta * kl
        losses.append(token.mean(0))
        kls.append(kl.detach().mean(0))
    return torch.stack(losses).mean(), torch.stack(kls).mean()


class LARESGRPO(SequentialRecommender):
    """The stage-1 model as the policy, a frozen copy as the reference, the GRPO loss."""

    layout = "sequence"

    def __init__(self, cfg: LARESGRPOConfig, n_items: int, stage1: LARES | None = None):
        super().__init__()
        if cfg.group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages are relative to the group), got {cfg.group_size}")
        if cfg.reward_metric not in REWARDS:
            raise ValueError(f"reward_metric must be one of {REWARDS}, got {cfg.reward_metric!r}")
        if cfg.reward_k < 1 or cfg.beta < 0:
            raise ValueError(f"reward_k must be >= 1 and beta >= 0, got {cfg.reward_k} and {cfg.beta}")
        if stage1 is None:
            raise ValueError("LARES stage 2 needs its pre-trained stage-1 (lares-ssl) model")
        if stage1.cfg != cfg.stage1() or stage1.n_items != n_items:
            raise ValueError("the stage-1 model was built with another config or item count")
        self.cfg, self.n_items = cfg, n_items
        weights = stage1.state_dict()
        self.policy = LARES(cfg.stage1(), n_items)
        self.policy.load_state_dict(weights)
        self.reference = LARES(cfg.stage1(), n_items)
        self.reference.load_state_dict(weights)
        self.reference.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LARESGRPO":
        super().train(mode)
        self.reference.eval()  # frozen: never dropout, whatever the outer mode
        return self

    @property
    def output_views(self) -> int:
        """Rows scored against every item per sample: G rollouts x the expected depth, the
        reference's forward-only rows counted as a third of a trained row."""
        depth = self.cfg.depth + (1 if self.cfg.depth_sampling == "poisson-lognormal" else 0)
        return max(1, round(self.cfg.group_size * depth * 4 / 3))

    def scores(self, batch) -> torch.Tensor:
        return self.policy.scores(batch)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        has_target = batch.targets > 0
        target = batch.targets[has_target]
        depths, lps, rewards = [], [], []
        for _ in range(cfg.group_size):
            depth = self.policy.sample_depth()
            steps = self.policy.reason(self.policy.pre_block(batch.items), depth)[:, has_target]
            lp, reward = rollout_terms(self.policy, steps, target, cfg.reward_k, cfg.reward_metric)
            depths.append(depth)
            lps.append(lp)
            rewards.append(reward)
        with torch.no_grad():  # one pass: step t of the reference is the same in every rollout
            ref_steps = self.reference.reason(self.reference.pre_block(batch.items), max(depths))[:, has_target]
            ref_all, _ = step_terms(self.reference, ref_steps, target)
        ref_lps = [ref_all[:d] for d in depths]
        rewards_t = torch.stack(rewards)
        loss, kl = grpo_loss(lps, ref_lps, group_advantages(rewards_t, cfg.adv_eps), cfg.beta)
        return {"loss": loss, "reward": rewards_t.mean(), "kl": kl}
