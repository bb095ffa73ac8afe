"""LARES (Liu et al., 2025, "LARES: Latent Reasoning for Sequential Recommendation",
arXiv 2505.16865): depth-recurrent latent reasoning that refines every token at every step.
Stage 1 only (self-supervised pre-training, SPT); the GRPO post-training stage (RPT) is not
built, so this is registered as `lares-ssl`, not `lares`.

Sources. The authors' code is only at an anonymous host, not reachable here, and the paper's
method section could not be read either: the stored copies of the arXiv page and of a review of
it (themoonlight.io) give the abstract and the architecture equations only. So the architecture
below follows those equations, and the two alignment losses follow the abstract and the
project's notes (../shared/notes/baselines.md); every detail the text did not fix is a choice,
listed below.

Followed (architecture, from the paper's equations):
- Items as SASRec here: item + position embeddings (positions 0..n-1 from the oldest item),
  LayerNorm + dropout, N(0, 0.02) init, eps 1e-12, output tied to the item embeddings.
- A pre-block A of `pre_layers` transformer layers: H = A(E + P), (B, L, d).
- A core block C of `core_layers` transformer layers, applied k = `iterations` times with the
  same weights (parameters do not grow with k): T_i = C(LN(f(T_{i-1}, H))), i = 1..k, from
  T_0 = omega * z, z ~ N(0, sigma^2 I). T_0, f and C act on all L tokens, so every token is
  refined at every step (the paper's point against one-reasoning-token methods such as ReaRec).
  H is injected again at every step through f.
- Stage 1's two objectives: trajectory-level alignment with sequences that have the same
  target as positives, and step-level alignment; next-item CE (full softmax over all items) on
  the final thought T_k. Scores: T_k at the last item @ item embeddings.T.

Choices (not fixed by what could be read):
- Transformer layers are the harness's post-LN SASRec block, causal. Sizes: hidden 64, inner
  256, 2 heads, dropout 0.5 (hidden and attention) as every model here; 1 pre-block layer and
  1 core layer (the same parameter count as a 2-layer SASRec).
- k = 4 iterations by default: the paper studies several depths; its default could not be
  checked, so 4 is the first enqueued value and the study searches 1..8.
- f = addition (`aggregate = "add"`; "concat" = a linear map of [T; H] to d, as the recurrent-
  depth LLM LARES builds on). The paper names both as options; its default was not readable.
- omega and sigma are fixed scalars (1.0, 0.1): T_0 = omega * sigma * N(0, I), a small random
  initial thought. Training samples z every forward pass; evaluation uses z's mean, T_0 = 0, so
  rankings are deterministic.
- Trajectory alignment (`traj`): a supervised-contrastive (SupCon) loss over the final thoughts
  at the batch's samples, cosine similarity / `temperature`. Positives of a sample: every other
  sample in the batch with the same target (the paper's positives) and, with `traj_views` = 2,
  a second reasoning trajectory of the sample itself: the same H, a new initial thought T_0 and
  new dropout masks in the core block (two trajectories of one history should end at the same
  thought). In-batch same-target pairs are rare on real data (thousands of items, 256 samples a
  batch), which is why the second trajectory is the default; with `traj_views` = 1 only
  samples with an in-batch positive contribute. CE is taken on the first trajectory only.
- Step alignment (`step`): consecutive thoughts of one trajectory agree: for i = 1..k-1, T_i of
  each sample must pick out T_{i+1} of the same sample among the batch's (InfoNCE, cosine /
  `temperature`), with the later step as a fixed target (stop-gradient): earlier steps are
  pulled towards the more refined later ones, not the reverse. Mean over steps. Undefined for
  k = 1 (no term).
- Loss = ce + traj_weight * traj + step_weight * step (weights 0.1 and 0.1, temperature 0.1:
  choices). A term whose weight is 0 is not computed and its key is left out of the loss dict
  (no second trajectory either), so logged curves never show a term that was not trained.
- Layout "sequence": C, f, LN and T_0 act per position and attention is causal, so the state at
  position j depends only on items 0..j (and the noise there): one pass over a user's row gives
  every prefix its own reasoning, exactly as one "prefix" row per sample would, at a fraction
  of the cost (109k training samples an epoch on Amazon Toys). The samples of the contrastive
  terms are the positions with a target, so a batch contrasts `batch_size` samples in either
  layout.

Missing: stage 2, reinforcement post-training (GRPO with ranking rewards over groups of
sampled reasoning trajectories); no random reasoning depth during training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Dropout, SequentialRecommender, TransformerConfig, info_nce, init_weights, last_position
from models.losses import item_scores, linear_cross_entropy
from models.sasrec import PostLNBlock

AGGREGATES = ("add", "concat")


@dataclass
class LARESConfig(TransformerConfig):
    pre_layers: int = 1  # pre-block A
    core_layers: int = 1  # core block C, shared by all iterations
    iterations: int = 4  # k
    aggregate: str = "add"  # f(T, H): "add" | "concat"
    omega: float = 1.0  # T_0 = omega * z
    sigma: float = 0.1  # z ~ N(0, sigma^2 I)
    traj_weight: float = 0.1
    step_weight: float = 0.1
    temperature: float = 0.1  # of both alignment terms (cosine similarities)
    traj_views: int = 2  # reasoning trajectories per sample for the trajectory alignment


class LARES(SequentialRecommender):
    """Pre-block + iterated core block, stage 1 objectives (no GRPO)."""

    layout = "sequence"

    def __init__(self, cfg: LARESConfig, n_items: int):
        super().__init__()
        if cfg.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {cfg.iterations}")
        if cfg.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {cfg.aggregate!r}")
        if cfg.traj_views not in (1, 2):
            raise ValueError(f"traj_views must be 1 or 2, got {cfg.traj_views}")
        self.cfg, self.n_items = cfg, n_items
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.dropout)
        self.pre = nn.ModuleList(PostLNBlock(cfg) for _ in range(cfg.pre_layers))
        self.adapter = nn.Linear(2 * d, d) if cfg.aggregate == "concat" else None
        self.core_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.core = nn.ModuleList(PostLNBlock(cfg) for _ in range(cfg.core_layers))
        self.apply(lambda m: init_weights(m, cfg.init_std))

    # ------------------------------------------------------------------------------ forward
    def pre_block(self, items: torch.Tensor) -> torch.Tensor:
        """H = A(E + P), (B, L, d)."""
        pos = torch.arange(items.shape[1], device=items.device)
        h = self.emb_drop(self.emb_ln(self.item_emb(items) + self.pos_emb(pos)[None]))
        for block in self.pre:
            h = block(h)
        return h

    def initial_thought(self, h: torch.Tensor) -> torch.Tensor:
        """T_0 = omega * z, z ~ N(0, sigma^2 I) in training; its mean, 0, in evaluation."""
        if not self.training or self.cfg.omega * self.cfg.sigma == 0:
            return torch.zeros_like(h)
        return self.cfg.omega * self.cfg.sigma * torch.randn_like(h)

    def core_step(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """T_i = C(LN(f(T_{i-1}, H)))."""
        x = t + h if self.adapter is None else self.adapter(torch.cat([t, h], dim=-1))
        x = self.core_ln(x)
        for block in self.core:
            x = block(x)
        return x

    def reason(self, h: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """Thoughts T_1..T_k of every token, (k, B, L, d)."""
        t = self.initial_thought(h)
        thoughts = []
        for _ in range(self.cfg.iterations if iterations is None else iterations):
            t = self.core_step(t, h)
            thoughts.append(t)
        return torch.stack(thoughts)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Final thoughts T_k, (B, L, d)."""
        return self.reason(self.pre_block(items))[-1]

    # ------------------------------------------------------------------------------ objectives
    def loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        has_target = batch.targets > 0
        target = batch.targets[has_target]  # (N,) one per sample
        h = self.pre_block(batch.items)
        traj_on = cfg.traj_weight > 0
        views = cfg.traj_views if traj_on else 1
        B = h.shape[0]
        thoughts = self.reason(h.repeat(views, 1, 1) if views > 1 else h)  # (k, views*B, L, d)
        steps = thoughts[:, :B][:, has_target]  # (k, N, d): the first trajectory's thoughts
        final = steps[-1]
        ce = linear_cross_entropy(final, self.item_emb.weight, target)
        loss, out = ce, {"ce": ce.detach()}
        with torch.autocast(final.device.type, enabled=False):  # cosine / 0.1: keep fp32
            if traj_on:
                z = [final] + [thoughts[-1, v * B:(v + 1) * B][has_target] for v in range(1, views)]
                traj = sup_con(torch.cat(z).float(), target.repeat(views), cfg.temperature)
                loss = loss + cfg.traj_weight * traj
                out["traj"] = traj.detach()
            if cfg.step_weight > 0 and cfg.iterations > 1:
                step = torch.stack([info_nce(steps[i].float(), steps[i + 1].detach().float(), cfg.temperature)
                                    for i in range(cfg.iterations - 1)]).mean()
                loss = loss + cfg.step_weight * step
                out["step"] = step.detach()
        return {"loss": loss, **out}

    def scores(self, batch) -> torch.Tensor:
        return item_scores(last_position(self.encode(batch.items), batch.lengths), self.item_emb.weight)


def sup_con(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over rows of z (M, d) with labels (M,):
    for each anchor with at least one positive (another row with its label), the mean over its
    positives of -log softmax over all other rows of cosine / tau; mean over those anchors
    (0 when no row has a positive)."""
    z = F.normalize(z, dim=-1)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / tau).masked_fill(self_mask, float("-inf"))
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(self_mask, 0.0)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.new_zeros(())
    per_anchor = -(log_prob * pos).sum(1)[has] / n_pos[has]
    return per_anchor.mean()
