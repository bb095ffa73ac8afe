"""ReaRec (Tang et al., 2025, "Think before recommend"): implicit multi-step reasoning on a
SASRec backbone, with its two learning methods ERL and PRL.

Followed the authors' code (`TangJiakai/ReaRec`: `src/models/ERL.py`, `src/models/PRL.py`,
`src/utils/layers.py` ReaRecAutoRegressiveWrapper + TransformerEncoder with a KV cache):
- Backbone: post-LN RecBole-style blocks (the harness's SASRec block), item + position
  embeddings with positions 0..n-1 from the oldest item, N(0, 0.02) init, eps 1e-12,
  dropout 0.5 on hidden states and attention, output tied to the item embeddings.
- Reasoning: the encoder reads the history causally; its last-layer state at the last item is
  step 0's output o_0. Step k = 1..K feeds o_{k-1} + a learned reasoning-position embedding
  (row k-1 of a K-row table; reasoning tokens get no item position) back as the next input
  token, through the same input LayerNorm + dropout as the items, and its last-layer state is
  o_k. Each reasoning token attends causally to the history's items and the earlier reasoning
  tokens through the per-layer key/value cache (so the items' states, and their dropout masks,
  are computed once per forward, as in the released code). Outputs: o_0..o_K (K+1 vectors).
- Logits are o @ item_embeddings.T / temperature (0.07).
- ERL (`rearec-erl`): the user representation is the mean of o_0..o_K; loss = CE(mean / tau)
  - kl_weight * mean over ordered pairs i != j of KL(p_j || sg(p_i)), p_k = softmax(o_k W / tau),
  the gradient flowing through p_j only (the code detaches the log-probabilities it compares
  against). Defaults from ERL.py: K = 2, tau = 0.07, kl_weight = 0.05. No noise in ERL.
- PRL (`rearec-prl`): scores from o_K; loss = CE(o_K / tau) + pl_weight * mean_k<K
  CE(o_k / (tau * alpha^(K-k))) (progressive temperatures; alpha = `temp_scale` 5.0,
  pl_weight 1.0) + cl_weight * InfoNCE. For the InfoNCE the batch is run twice: the second
  copy has its own dropout masks, and its reasoning input at each step is the clean chain's
  o_{k-1} + position + Gaussian noise (std `noise` 0.01), as in the code; for every reasoning
  step the noisy output must pick its own clean output among the batch's, by dot product /
  tau (the code's similarity, no cosine), averaged over steps. Defaults from PRL.py:
  noise 0.01, cl_weight 1.0, warm-up 2 epochs (noise and InfoNCE from epoch 3 on).

Choices:
- ERL's KL weight: 0.005, not the code's 0.05: at width 64 on Amazon Toys the code's weight
  lets the diversity reward -kl_weight * KL take over from the first epoch (the CE stays near
  ln N while the KL grows), and the model never learns to rank; 0.005 trains (docs/results.md).
  The tuning study searches 1e-3..0.1 and enqueues both values.
- Sizes and batch: hidden 64 (the harness's fixed d) with inner 256 (4 x d as SASRec here),
  2 layers x 2 heads as the code, and the harness's batch 256. The code trains width 256
  (`emb_size`) with inner 300 (`inner_size`) and batch 2048 (`src/helpers/BaseRunner.py`, Adam
  lr 1e-3, early stop after 10 epochs without gain, as here): both tuning studies search width
  {64, 256} and batch 256..2048 and enqueue the code's settings after its model defaults at
  width 64 (studies/rearec-erl.toml, studies/rearec-prl.toml).
- Temperature: 0.07 in both (the code's default). ERL's study keeps it fixed; PRL's searches it
  (log 0.05..5), since in PRL it sets every step's temperature (tau * alpha^(K-k)) and the
  InfoNCE's scale at once.
- The released code hard-codes dropout 0.2 on the (item and reasoning) input embeddings and
  uses `dropout` (0.5) inside the blocks: kept as `emb_dropout` = 0.2.
- PRL warm-up: the released code builds the noisy copy only after the warm-up epochs but
  always adds the contrastive term, so the warm-up epochs fail (cl_loss undefined). Here the
  paper's intent: no noise and no InfoNCE while epoch <= warmup (set by `on_epoch_start`,
  epochs counted from 1 as in the code's runner), both on afterwards. A model whose
  `on_epoch_start` was never called is in warm-up.
- Layout "prefix": the reasoning tokens must follow the last item of each history, and each
  sample's reasoning chain sees only its own history. The "sequence" layout would need one
  chain per prefix inside a row; the output layer (K + 1 full-softmax logits per sample)
  dominates the cost anyway, and PRL's InfoNCE then contrasts samples of different prefixes
  as the code's batches do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (NON_NEGATIVE, POSITIVE, RATE, Dropout, OneOf, Range, SequentialRecommender, TransformerConfig,
                         at_least, attention, init_weights, last_position)
from models.losses import ensemble_objective, item_scores, linear_cross_entropy
from models.sasrec import PostLNBlock


@dataclass
class ReaRecConfig(TransformerConfig):
    layers: int = 2
    emb_dropout: float = 0.2  # on item and reasoning inputs (hard-coded 0.2 in the code)
    reason_steps: int = 2  # K
    temperature: float = 0.07

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "layers": at_least(1), "emb_dropout": RATE, "reason_steps": at_least(1), "temperature": POSITIVE}


@dataclass
class ReaRecERLConfig(ReaRecConfig):
    # the code's 0.05 collapses on Amazon Toys at width 64 (see the module docstring)
    kl_weight: float = 0.005

    RANGES: ClassVar[dict[str, Range | OneOf]] = {"kl_weight": NON_NEGATIVE}


@dataclass
class ReaRecPRLConfig(ReaRecConfig):
    pl_weight: float = 1.0
    temp_scale: float = 5.0  # alpha: step k's temperature is tau * alpha^(K-k)
    noise: float = 0.01  # gamma: std of the Gaussian noise on the reasoning inputs
    cl_weight: float = 1.0
    warmup: int = 2  # epochs without noise and InfoNCE

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "pl_weight": NON_NEGATIVE, "temp_scale": POSITIVE, "noise": NON_NEGATIVE, "cl_weight": NON_NEGATIVE,
        "warmup": at_least(0)}


def _cached_block(block: PostLNBlock, x: torch.Tensor, cache: list, key_mask: torch.Tensor | None):
    """One post-LN block over new tokens x (B, n, d) that also attend to cached keys/values.

    `cache` holds this layer's [keys, values] (B, h, S, dh) of earlier tokens and is extended
    in place. Without `key_mask` the tokens are the history itself (causal attention);
    with it, x is one reasoning token per row attending to the cached keys where key_mask
    (B, S + 1) is True."""
    attn = block.attn
    B, n, d = x.shape
    q, k, v = attn.qkv(x).view(B, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    if cache:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    cache[:] = [k, v]
    p = attn.attn_dropout if block.training else 0.0
    if key_mask is None:
        y = attention(q, k, v, dropout_p=p, is_causal=True)
    else:
        y = attention(q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=p)
    x = block.ln1(x + block.drop(attn.out(y.transpose(1, 2).reshape(B, n, d))))
    return block.ln2(x + block.drop(block.ffn(x)))


class ReaRec(SequentialRecommender):
    """The shared backbone and reasoning loop; ReaRecERL and ReaRecPRL add their objectives."""

    layout = "prefix"

    def __init__(self, cfg: ReaRecConfig, n_items: int):
        super().__init__()
        if cfg.reason_steps < 1:
            raise ValueError(f"reason_steps must be at least 1, got {cfg.reason_steps}")
        self.cfg, self.n_items = cfg, n_items
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.reason_pos_emb = nn.Embedding(cfg.reason_steps, d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(PostLNBlock(cfg) for _ in range(cfg.layers))
        self.apply(lambda m: init_weights(m, cfg.init_std))

    def reason(self, items: torch.Tensor, lengths: torch.Tensor,
               noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step outputs o_0..o_K, (B, K+1, d); with `noise` > 0 also those of a second copy of
        the batch whose reasoning inputs are the clean o_{k-1} + position + N(0, noise^2)."""
        K = self.cfg.reason_steps
        B, L = items.shape
        copies = 2 if noise > 0 else 1
        items, lengths = items.repeat(copies, 1), lengths.repeat(copies)
        pos = torch.arange(L, device=items.device)
        x = self.emb_drop(self.emb_ln(self.item_emb(items) + self.pos_emb(pos)[None]))
        caches: list[list] = [[] for _ in self.blocks]
        for block, cache in zip(self.blocks, caches):
            x = _cached_block(block, x, cache, None)
        out = last_position(x, lengths)  # (copies * B, d)
        outputs = [out]
        key_mask = (pos[None] < lengths[:, None])  # real items; padding is never attended
        for step in range(K):
            clean = out[:B] + self.reason_pos_emb.weight[step]
            inp = clean if copies == 1 else torch.cat([clean, clean + noise * torch.randn_like(clean)])
            key_mask = torch.cat([key_mask, key_mask.new_ones(copies * B, 1)], dim=1)
            x = self.emb_drop(self.emb_ln(inp))[:, None]
            for block, cache in zip(self.blocks, caches):
                x = _cached_block(block, x, cache, key_mask)
            out = x[:, 0]
            outputs.append(out)
        o = torch.stack(outputs, dim=1)
        return o[:B], (o[B:] if copies == 2 else None)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight.T / self.cfg.temperature

    def item_ce(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE of `item_logits(h)` (h (R, d)), fused: the logits are never kept."""
        return linear_cross_entropy(h / self.cfg.temperature, self.item_emb.weight, target)

    def user_vector(self, o: torch.Tensor) -> torch.Tensor:  # pragma: no cover - subclasses
        raise NotImplementedError

    def scores(self, batch) -> torch.Tensor:
        o, _ = self.reason(batch.items, batch.lengths)
        return item_scores(self.user_vector(o), self.item_emb.weight) / self.cfg.temperature


class ReaRecERL(ReaRec):
    """Ensemble Reasoning Learning: mean of the step outputs, KL diversity between steps."""

    cfg: ReaRecERLConfig

    def user_vector(self, o: torch.Tensor) -> torch.Tensor:
        return o.mean(dim=1)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        o, _ = self.reason(batch.items, batch.lengths)
        if self.cfg.kl_weight == 0:
            return {"loss": self.item_ce(self.user_vector(o), batch.target)}
        # CE of the mean vector's logits (= the steps' mean) - kl_weight * pairwise_kl(step logits),
        # fused: the (B, K+1, N) step logits never enter autograd
        loss, ce, kl = ensemble_objective(o, self.item_emb.weight, batch.target, self.cfg.temperature,
                                          self.cfg.kl_weight)
        return {"loss": loss, "ce": ce, "kl": kl}


def pairwise_kl(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows and ordered pairs i != j of KL(p_j || sg(p_i)) for logits (B, T, N)."""
    T = logits.shape[1]
    with torch.autocast(logits.device.type, enabled=False):  # a small difference of large sums
        log_p = F.log_softmax(logits.float(), dim=-1)
        p = log_p.exp()
        log_q = log_p.detach()
        # KL(p_j || q_i) = sum_n p_j (log p_j - log q_i), as a (B, T_i, T_j) table
        kl = (p * log_p).sum(-1)[:, None, :] - torch.einsum("bjn,bin->bij", p, log_q)
    off_diagonal = ~torch.eye(T, dtype=torch.bool, device=logits.device)
    return kl[:, off_diagonal].mean()


class ReaRecPRL(ReaRec):
    """Progressive Reasoning Learning: annealed temperatures over the steps, noisy-copy InfoNCE."""

    cfg: ReaRecPRLConfig

    def __init__(self, cfg: ReaRecPRLConfig, n_items: int):
        super().__init__(cfg, n_items)
        self.epoch = 0  # on_epoch_start sets it; 0 = warm-up

    def on_epoch_start(self, epoch: int, data=None) -> None:
        self.epoch = epoch

    @property
    def contrastive_active(self) -> bool:
        return self.epoch > self.cfg.warmup and self.cfg.noise > 0 and self.cfg.cl_weight > 0

    def user_vector(self, o: torch.Tensor) -> torch.Tensor:
        return o[:, -1]

    def loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        K = cfg.reason_steps
        o, noisy = self.reason(batch.items, batch.lengths, noise=cfg.noise if self.contrastive_active else 0.0)
        target = batch.target
        ce = self.item_ce(o[:, -1], target)
        # earlier steps k = 0..K-1 at temperature tau * alpha^(K-k): softer targets early on
        # (dividing the logits by a scale = dividing the state by it: the product is linear)
        scale = cfg.temp_scale ** torch.arange(K, 0, -1, device=o.device, dtype=o.dtype)
        early = o[:, :-1] / scale[None, :, None]
        pl = self.item_ce(early.reshape(-1, early.shape[-1]), target.repeat_interleave(K))
        out = {"ce": ce.detach(), "pl": pl.detach()}
        loss = ce + cfg.pl_weight * pl
        if noisy is not None:
            # per reasoning step: noisy output b should match clean output b among the batch's
            with torch.autocast(o.device.type, enabled=False):  # dot products / 0.07: keep fp32
                sim = torch.einsum("btd,ktd->tbk", noisy[:, 1:].float(), o[:, 1:].float()) / cfg.temperature
            labels = torch.arange(o.shape[0], device=o.device).repeat(K)
            cl = F.cross_entropy(sim.reshape(-1, sim.shape[-1]), labels)
            loss = loss + cfg.cl_weight * cl
            out["cl"] = cl.detach()
        return {"loss": loss, **out}
