"""LARES (Liu et al., 2025, "LARES: Latent Reasoning for Sequential Recommendation",
arXiv 2505.16865): depth-recurrent latent reasoning that refines every token at every step.
This file is the model and its stage 1 (self-supervised training, registered as `lares-ssl`);
stage 2, GRPO post-training from the stage-1 checkpoint, is models/lares_rl.py (`lares`).

Source: the port of LARES by the authors' lab in RUCAIBox/RecBole3.0 (its lares `model.py`,
`data.py`, `config.py` and `configs/model/lares.yaml`; the yaml that comes with the GRPO stage
is the one followed here). Read to learn the algorithm and its defaults; the code is this
project's own. The figures in docs/results.md under "LARES" before this rewrite were of an
earlier lares-ssl built from the paper's equations alone (post-LN blocks, 1 + 1 layers, fixed
k = 4, a small Gaussian starting thought, in-batch SupCon): this one trains differently and
gives other numbers.

The model, followed from the port:
- Items as SASRec here: item + position embeddings (positions 0..n-1 from the oldest item),
  LayerNorm + dropout, N(0, 0.02) init, eps 1e-12, output tied to the item embeddings.
- Pre-LN transformer blocks (`PreLNBlock`: x + drop(attn(LN x)); x + drop(fc2(drop(gelu(fc1(LN
  x)))))), causal, no LayerNorm after a stack, as the port's blocks (unlike SASRec's post-LN).
- A pre-block A of `pre_layers` = 2 blocks run once: H = A(E + P), (B, L, d).
- A core block C of `core_layers` = 2 blocks with shared weights, iterated:
  T_i = C(LN(f(T_{i-1}, H))), f = the mean (T + H) / 2 (the port's "add"; "concat" = a linear
  map of [T; H] to d). H is injected again at every step; every token is refined at every step.
- The starting state T_0 = `state_scale` * N(0, `state_std`^2) truncated at +-3 std, per token
  (3 * N(0, 1): the port's "normal" start). It is large on purpose: the first step's input is
  mostly the random state, so each forward pass is one of many reasoning trajectories.
- Depth: training draws one depth per forward pass, 1 + Poisson(r) with r log-normal of mean
  `depth` (sigma 0.5), at most 3 * `depth` ("poisson-lognormal": the port's scheme; its mean is
  `depth` + 1); evaluation runs `depth` = 3 steps. "constant" runs `depth` steps always.
- Scores: the final state at the last item @ item embeddings.T (`similarity` "dot", the port's
  config; "cos" = cosine / `temperature` for the scores and the CE as well, the port's option).

Stage 1's objective (the port's `compute_loss`), three encoder passes per batch:
- CE: full-softmax next-item cross-entropy on the final state of one pass at its own depth.
- Trajectory alignment (`traj_weight` 0.2): a second pass over the batch at a new depth n gives
  each sample's final state; its partner is another training sample with the same target,
  encoded at the same depth n (the port's `same_step`: "augmented sequences use the same
  recurrence steps"). Symmetric InfoNCE over the batch's samples ((cl(a, p) + cl(p, a)) / 2,
  logits = dot / `temperature` = 1.0, no false-negative masking), as the port.
- Step alignment (`step_weight` 0.1): the same symmetric InfoNCE between that pass's final state
  and its state after a random intermediate step (no term when n = 1; logged as 0).
- Loss = ce + traj_weight * traj + step_weight * step; both directions get gradients.

Where this differs from the port, and why:
- The partner: drawn from the whole training set by ICSRec's partner index
  (models/icsrec.py: `build_partner_index`, `same_target_partners`, with this model's own
  index): a sample with the same target and a different history, anew at every batch, else the
  sample itself (then the pair is two trajectories of one history, as the port's fallback).
  The port draws one partner per sample once, before training, and may pick an equal history.
- Step alignment draws among the intermediate steps 1..n-1 only. The port draws among all n,
  the final one included, which pairs the final state with itself (no reasoning signal; with
  dot similarity it only rewards larger norms).
- Evaluation's starting state: the port draws a new random T_0 at every evaluation, so its
  rankings change from one evaluation to the next. Here evaluation uses one fixed draw of the
  same distribution (`eval_state_seed`, drawn on the CPU, one vector per position shared by
  every row): deterministic and the same on every device and in every batch, while a row still
  starts from a state like those it was trained from (T_0 = 0 would not be: at scale 3 the
  training inputs are mostly noise).
- History length 50 (the fixed protocol of ARCHITECTURE.md, a trainer setting: `--max-len`);
  the port's yaml uses 20 (an earlier version of it 50). Adam, not AdamW (the shared trainer).
- Layout "sequence": blocks, f, LN and T_0 act per position and attention is causal, so the
  state at position j depends only on items 0..j (and the noise there): one pass over a user's
  row gives every prefix its reasoning, as one "prefix" row per sample would (109k training
  samples an epoch on Amazon Toys). Contrastive terms run over the positions with a target, so
  a batch contrasts `batch_size` samples either way. One depth per pass holds for the whole
  batch, as the port's.
- Partners are encoded as prefix rows (their histories are other users'), packed side by side
  into rows as wide as the longest (`pack`: each token attends to its own sequence only, and
  positions restart per sequence), so the same states as one right-padded row each, at 2.2x
  less CPU time per stage-1 batch than padded length groups (the partner pass was 86% of it).
  Contrastive logits are fp32 outside any autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (NON_NEGATIVE, POSITIVE, Dropout, Linear, OneOf, Packed, Range, SelfAttention,
                         SequentialRecommender, TransformerConfig, at_least, init_weights, last_position, pack)
from models.icsrec import build_partner_index, same_target_partners
from models.losses import item_scores, linear_cross_entropy

AGGREGATES = ("add", "concat")
DEPTH_SAMPLING = ("poisson-lognormal", "constant")
SIMILARITIES = ("dot", "cos")
_LOGNORMAL_SIGMA = 0.5
_LENGTH_GROUPS = 8  # final_states_grouped (the packed pass's tested reference): up to this many groups,
_GROUP_ROWS = 32  # of at least this many rows each


@dataclass
class LARESConfig(TransformerConfig):
    # hidden 64, inner 256, 2 heads, dropout 0.5 / 0.5: TransformerConfig (the port's yaml too)
    pre_layers: int = 2  # pre-block A
    core_layers: int = 2  # core block C, shared by all steps
    depth: int = 3  # evaluation depth; the mean of the training depth's Poisson rate
    depth_sampling: str = "poisson-lognormal"  # or "constant"
    state_std: float = 1.0  # T_0 = state_scale * N(0, state_std^2), truncated at +-3 std
    state_scale: float = 3.0
    eval_state_seed: int = 0  # evaluation's one fixed draw of T_0
    aggregate: str = "add"  # f(T, H): "add" = (T + H) / 2 | "concat"
    similarity: str = "dot"  # scores and alignment terms: "dot" | "cos" (cosine / temperature)
    temperature: float = 1.0
    traj_weight: float = 0.2  # the port's alpha
    step_weight: float = 0.1  # the port's gamma

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "pre_layers": at_least(0), "core_layers": at_least(1), "depth": at_least(1),
        "depth_sampling": OneOf(DEPTH_SAMPLING), "state_std": NON_NEGATIVE, "state_scale": NON_NEGATIVE,
        "aggregate": OneOf(AGGREGATES), "similarity": OneOf(SIMILARITIES), "temperature": POSITIVE,
        "traj_weight": NON_NEGATIVE, "step_weight": NON_NEGATIVE}


class PreLNBlock(nn.Module):
    """Causal pre-LN transformer block, dropout on both sublayer outputs and inside the FFN."""

    def __init__(self, cfg: LARESConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.hidden, cfg.heads, cfg.attn_dropout)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.fc1, self.fc2 = Linear(cfg.hidden, cfg.inner), Linear(cfg.inner, cfg.hidden)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask=attn_mask))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.ln2(x))))))


def truncated_normal(shape: tuple[int, ...], std: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std^2) truncated at +-3 std (inverse CDF of a uniform draw, as nn.init.trunc_normal_)."""
    lo = 0.5 * (1.0 + math.erf(-3.0 / math.sqrt(2.0)))  # Phi(-3)
    u = torch.empty(shape, device=device).uniform_(2 * lo - 1, 1 - 2 * lo, generator=generator)
    return u.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-3 * std, 3 * std)


def align(x: torch.Tensor, y: torch.Tensor, tau: float, similarity: str = "dot") -> torch.Tensor:
    """The port's symmetric InfoNCE: row i of x and row i of y are a pair, the batch's other rows
    the negatives, (CE(x y^T / tau) + CE(y x^T / tau)) / 2. fp32 outside any autocast."""
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        if similarity == "cos":
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        logits = x @ y.T / tau
        labels = torch.arange(x.shape[0], device=x.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class LARES(SequentialRecommender):
    """Pre-block + iterated core block, stage 1 objectives."""

    layout = "sequence"

    def __init__(self, cfg: LARESConfig, n_items: int):
        super().__init__()
        if cfg.depth < 1:
            raise ValueError(f"depth must be at least 1, got {cfg.depth}")
        for name, value, allowed in (("aggregate", cfg.aggregate, AGGREGATES),
                                     ("depth_sampling", cfg.depth_sampling, DEPTH_SAMPLING),
                                     ("similarity", cfg.similarity, SIMILARITIES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.cfg, self.n_items = cfg, n_items
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.dropout)
        self.pre = nn.ModuleList(PreLNBlock(cfg) for _ in range(cfg.pre_layers))
        self.adapter = Linear(2 * d, d) if cfg.aggregate == "concat" else None
        self.core_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.core = nn.ModuleList(PreLNBlock(cfg) for _ in range(cfg.core_layers))
        self.apply(lambda m: init_weights(m, cfg.init_std))
        # the same-target partner index, set by on_epoch_start (recomputed, never checkpointed)
        self._split = None
        self._index = None

    # ------------------------------------------------------------------------------ forward
    def pre_block(self, items: torch.Tensor, packed: "Packed | None" = None) -> torch.Tensor:
        """H = A(E + P), (B, L, d). `packed`: the rows hold several sequences each (`pack`)."""
        if packed is None:
            pos = torch.arange(items.shape[1], device=items.device)[None]
        else:
            pos = packed.positions
        h = self.emb_drop(self.emb_ln(self.item_emb(items) + self.pos_emb(pos)))
        mask = None if packed is None else packed.mask
        for block in self.pre:
            h = block(h, mask)
        return h

    def sample_depth(self) -> int:
        """This forward pass's number of core steps (evaluation: `depth`)."""
        cfg = self.cfg
        if not self.training or cfg.depth_sampling == "constant":
            return cfg.depth
        mu = math.log(cfg.depth) - _LOGNORMAL_SIGMA ** 2 / 2  # E[rate] = depth
        rate = torch.empty(1).log_normal_(mu, _LOGNORMAL_SIGMA)
        return int(min(torch.poisson(rate).item() + 1, 3 * cfg.depth))

    def initial_state(self, h: torch.Tensor) -> torch.Tensor:
        """T_0: a fresh truncated-normal draw per token in training; in evaluation one fixed
        draw (one vector per position, the same for every row)."""
        cfg = self.cfg
        if cfg.state_scale == 0 or cfg.state_std == 0:
            return torch.zeros_like(h)
        if self.training:
            return (cfg.state_scale * truncated_normal(h.shape, cfg.state_std, h.device)).to(h.dtype)
        B, L, d = h.shape
        gen = torch.Generator().manual_seed(cfg.eval_state_seed)
        z = truncated_normal((max(L, cfg.max_len), d), cfg.state_std, "cpu", gen)[:L]
        return (cfg.state_scale * z).to(h.device, h.dtype).expand(B, L, d)

    def core_step(self, t: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """T_i = C(LN(f(T_{i-1}, H)))."""
        x = (t + h) / 2 if self.adapter is None else self.adapter(torch.cat([t, h], dim=-1))
        x = self.core_ln(x)
        for block in self.core:
            x = block(x, mask)
        return x

    def reason(self, h: torch.Tensor, depth: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """States T_1..T_depth of every token, (depth, B, L, d)."""
        t = self.initial_state(h)
        states = []
        for _ in range(depth):
            t = self.core_step(t, h, mask)
            states.append(t)
        return torch.stack(states)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Final states of one pass at a sampled (training) or the evaluation depth, (B, L, d)."""
        return self.reason(self.pre_block(items), self.sample_depth())[-1]

    def output(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, item matrix) whose product is the scores: dot, or cosine / temperature."""
        w = self.item_emb.weight
        if self.cfg.similarity == "cos":
            return F.normalize(h, dim=-1) / self.cfg.temperature, F.normalize(w, dim=-1)
        return h, w

    def scores(self, batch) -> torch.Tensor:
        return item_scores(*self.output(last_position(self.encode(batch.items), batch.lengths)))

    # ------------------------------------------------------------------------------ partners
    @torch.no_grad()
    def on_epoch_start(self, epoch: int, data=None) -> None:
        if data is None or self.cfg.traj_weight == 0:
            return
        if self._split is not data or self._index is None:
            self._split = data
            self._index = build_partner_index(data, self.cfg.max_len).to(self.item_emb.weight.device)

    @staticmethod
    def sample_histories(batch, has_target: torch.Tensor) -> SimpleNamespace:
        """Each sample of a "sequence" batch (a position with a target) as a right-padded prefix
        row: items[:j+1], its length and target, in the order of `x[has_target]`."""
        b, j = has_target.nonzero(as_tuple=True)
        width = int(j.max()) + 1 if len(j) else 1
        pos = torch.arange(width, device=b.device)
        items = torch.where(pos[None] <= j[:, None], batch.items[b, :width], 0)
        return SimpleNamespace(items=items, lengths=j + 1, target=batch.targets[b, j])

    def partners(self, batch, has_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A same-target partner per sample from the whole training split (ICSRec's index and
        draw; in-batch before on_epoch_start has run): right-padded (items, lengths)."""
        items, lengths, _ = same_target_partners(self.sample_histories(batch, has_target), self._index)
        return items, lengths

    def final_states(self, items: torch.Tensor, lengths: torch.Tensor, depth: int) -> torch.Tensor:
        """Final state at the last item of every row, (N, d): one pass at `depth` over the rows
        packed side by side into rows of the longest one's width (`pack`)."""
        packed = pack(items, lengths)
        t = self.reason(self.pre_block(packed.items, packed), depth, packed.mask)[-1]
        return t[packed.last_row, packed.last_col]

    def final_states_grouped(self, items: torch.Tensor, lengths: torch.Tensor, depth: int) -> torch.Tensor:
        """`final_states` without packing: in groups of rows of similar length, each cut to its
        longest row (exact: causal, right-padded). The reference the packed pass is tested
        against (the same states, to rounding, with dropout and T_0 off)."""
        order = torch.argsort(lengths, stable=True)
        out = []
        for idx in order.tensor_split(max(1, min(_LENGTH_GROUPS, len(order) // _GROUP_ROWS))):
            width = int(lengths[idx].max())
            t = self.reason(self.pre_block(items[idx, :width]), depth)[-1]
            out.append(last_position(t, lengths[idx]))
        return torch.cat(out)[torch.argsort(order)]

    # ------------------------------------------------------------------------------ objective
    def loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        has_target = batch.targets > 0
        target = batch.targets[has_target]  # (N,) one per sample
        final = self.encode(batch.items)[has_target]
        ce = linear_cross_entropy(*self.output(final), target)
        loss, out = ce, {"ce": ce.detach()}
        if cfg.traj_weight > 0 or cfg.step_weight > 0:
            depth = self.sample_depth()  # shared by the anchors' pass and their partners'
            steps = self.reason(self.pre_block(batch.items), depth)[:, has_target]  # (depth, N, d)
            anchor = steps[-1]
            if cfg.traj_weight > 0:
                p_items, p_len = self.partners(batch, has_target)
                traj = align(anchor, self.final_states(p_items, p_len, depth), cfg.temperature, cfg.similarity)
                loss = loss + cfg.traj_weight * traj
                out["traj"] = traj.detach()
            if cfg.step_weight > 0:
                step = anchor.new_zeros((), dtype=torch.float32)
                if depth > 1:
                    i = int(torch.randint(depth - 1, ()))  # an intermediate step, 1..depth-1
                    step = align(anchor, steps[i], cfg.temperature, cfg.similarity)
                loss = loss + cfg.step_weight * step
                out["step"] = step.detach()
        return {"loss": loss, **out}
