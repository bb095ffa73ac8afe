"""IGR-SR: intent-guided reasoning for sequential recommendation (the paper's section 3).

Pieces:
- LatentIntentDistiller (LID): a pre-trained SASRec of width d_l, FROZEN (no gradients, always
  in eval mode, so its weights never change and it applies no dropout). Input = k learnable
  prefix embeddings + the item sequence + m learnable <intent> embeddings; the encoder's
  outputs at the m intent positions are the raw intents T_1 (m x d_l). Only the prefix and
  intent embeddings (and every module after the LID) are trained.
  Position choice: items keep exactly the positions 0..n-1 they had in pre-training; prefix
  and intent tokens get NO position embedding (their learned embeddings can carry whatever
  placement signal they need). So k + n + m may exceed the encoder's 50-position table, and
  the frozen encoder sees every item as it did in pre-training. All tokens go through the
  encoder's input LayerNorm. The encoder is causal: items see the prefix, intents see all.
- Projection: MLP d_l -> d -> d (GELU), giving T_D (m x d).
- IDR: L dual-attention layers, eq. (5)-(7): H += CrossAttn(H, T_D, T_D); H += causal
  SelfAttn(H); H = LayerNorm(H + FFN(H)) (dropout on each sub-layer output). h_u = state
  at the last item.
- Only what is read is computed: the IDR's last layer runs its self-attention queries, FFN and
  LayerNorm at the last item alone, and the LID's last block at the m intent positions alone
  (`forward_at`, `encode_prefixed_at`). The same h_u and T_1 as the full passes (tested); in the
  "prefix" layout most positions of a row are nobody's output, so this halves those layers.
  The k prefix tokens come first in every row and see only each other, and the frozen encoder
  applies no dropout, so their states are the same in every row: they run through the encoder
  once per batch, their keys and values shared by every row's attention (tested against the
  plain pass over [prefix | items | intents] per row).
- Dropout on the attention weights: the self-attention takes `attn_dropout` (0.5, SASRec's
  recipe: 2-50 keys per query); the cross-attention has its own `cross_dropout`, default 0.0.
  Why: its keys are the m = 1..5 intents, so dropping attention weights drops whole intents
  for a position (at m = 1 and rate 0.5, half the positions lose the intent and the rest see
  it doubled), on top of ICR's masking of T_D, the paper's own regulariser of the intents.
  The cross-attention's output still gets the sub-layer dropout `dropout`; the paper gives no
  rate for the attention weights. `cross_dropout = 0.5` is the earlier behaviour (the
  cross-attention reused `attn_dropout`); the tuning study searches [0, 0.5]
  and enqueues both.
- ICR: two independent element-wise dropout masks (rate p_mask, rescaled by 1/(1-p) so that
  inference can use the unmasked intents, i.e. dropout semantics) on T_D, two IDR passes,
  InfoNCE between the two h_u over the batch (cosine / tau, eq. 10, averaged over the batch).
  The paper does not say which pass carries the recommendation loss: here the CE is averaged
  over the two masked views; total = CE + cl_weight * InfoNCE. Inference: unmasked T_D.

Variants (the paper's ablation): use_lid=False (w/o LID: the IDR with no cross-attention, no intents),
fusion="concat" (T_D prepended to the item sequence, positions counted over the whole
concatenation, self-attention only: the "positional contamination" the paper avoids),
use_icr=False (w/o ICR: one unmasked pass, no contrastive term; cl_weight=0 does the same).

Layout "prefix": a prefix's intents must come from that prefix only (intent tokens read the
whole input), so every training sample is its own row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.base import (NON_NEGATIVE, POSITIVE, RATE, CrossAttention, Dropout, FeedForward, Linear, OneOf, Range,
                         SelfAttention, SequentialRecommender, TransformerConfig, at_least, dropout, info_nce,
                         init_weights, last_position)
from models.losses import item_scores, linear_cross_entropy
from models.sasrec import SASRec


@dataclass
class IGRSRConfig(TransformerConfig):
    layers: int = 2  # IDR layers (the LID's encoder takes the same count)
    d_l: int = 32  # LID width (paper: 8, 16 or 32)
    k: int = 8  # prefix tokens
    m: int = 3  # <intent> tokens
    p_mask: float = 0.2
    tau: float = 0.2
    cl_weight: float = 0.1
    use_icr: bool = True
    use_lid: bool = True
    fusion: str = "cross"  # "cross" (the paper) or "concat" (ablation)
    # dropout on the cross-attention's weights over the m intents (not `attn_dropout`: see the
    # module docstring); 0.5 is the behaviour before this field existed
    cross_dropout: float = 0.0

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "layers": at_least(1), "d_l": at_least(1), "k": at_least(1), "m": at_least(1), "p_mask": RATE,
        "tau": POSITIVE, "cl_weight": NON_NEGATIVE, "fusion": OneOf(("cross", "concat")), "cross_dropout": RATE}
    # the LID's encoder is d_l wide with the same heads
    MULTIPLE_OF: ClassVar[dict[str, str]] = {"d_l": "heads"}


class LatentIntentDistiller(nn.Module):
    def __init__(self, encoder: SASRec, k: int, m: int, init_std: float = 0.02):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        d_l = encoder.cfg.hidden
        self.k, self.m = k, m
        self.prefix = nn.Parameter(torch.randn(k, d_l) * init_std)
        self.intent = nn.Parameter(torch.randn(m, d_l) * init_std)

    def train(self, mode: bool = True) -> "LatentIntentDistiller":
        super().train(mode)
        self.encoder.eval()  # frozen: never dropout, whatever the outer mode
        return self

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Raw intents T_1, (B, m, d_l)."""
        B, L = items.shape
        m = self.m
        x = torch.cat([self.encoder.item_inputs(items), self.intent.expand(B, m, -1)], dim=1)
        # place the intents right after each row's last item: [items | intents | pad] (the prefix
        # goes in front of every row inside the encoder)
        p = torch.arange(L + m, device=items.device)[None]
        end = lengths[:, None]
        src = torch.where(p < end, p, torch.where(p < end + m, p + L - end, p - m))
        x = x.gather(1, src[..., None].expand(-1, -1, x.shape[-1]))
        # the encoder's last block at the m intent positions only: nothing else is read; the k
        # prefix tokens, the same in every row and seeing only each other, run through it once
        at = end + torch.arange(m, device=items.device)[None]
        rows = torch.arange(B, device=items.device).repeat_interleave(m)
        return self.encoder.encode_prefixed_at(self.prefix[None], x, rows, at.flatten()).view(B, m, -1)


class DualAttentionLayer(nn.Module):
    """Eq. (5)-(7): cross-attention to the intents, causal self-attention, FFN + LayerNorm."""

    def __init__(self, cfg: IGRSRConfig, cross: bool):
        super().__init__()
        self.cross = CrossAttention(cfg.hidden, cfg.heads, cfg.cross_dropout) if cross else None
        self.self_attn = SelfAttention(cfg.hidden, cfg.heads, cfg.attn_dropout)
        self.ffn = FeedForward(cfg.hidden, cfg.inner)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, intents: torch.Tensor | None) -> torch.Tensor:
        if self.cross is not None:
            h = h + self.drop(self.cross(h, intents))
        h = h + self.drop(self.self_attn(h))
        return self.ln(h + self.drop(self.ffn(h)))

    def forward_at(self, h: torch.Tensor, intents: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        """`forward(h, intents)[arange(B), cols]` (B, d): the self-attention's queries, the FFN
        and the LayerNorm at one position per row only (the cross-attention, whose output the
        self-attention's keys read, still everywhere)."""
        if self.cross is not None:
            h = h + self.drop(self.cross(h, intents))
        rows = torch.arange(h.shape[0], device=h.device)
        h = h[rows, cols] + self.drop(self.self_attn.forward_at(h, rows, cols))
        return self.ln(h + self.drop(self.ffn(h)))


class IGRSR(SequentialRecommender):
    layout = "prefix"

    def __init__(self, cfg: IGRSRConfig, n_items: int, lid_encoder: SASRec | None = None):
        super().__init__()
        if cfg.fusion not in ("cross", "concat"):
            raise ValueError(f"fusion must be 'cross' or 'concat', not {cfg.fusion!r}")
        if cfg.use_lid and lid_encoder is None:
            raise ValueError("IGR-SR needs a pre-trained SASRec encoder for its LID")
        self.cfg, self.n_items = cfg, n_items
        d = cfg.hidden
        n_pos = cfg.max_len + (cfg.m if cfg.use_lid and cfg.fusion == "concat" else 0)
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(n_pos, d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.dropout)
        cross = cfg.use_lid and cfg.fusion == "cross"
        self.layers = nn.ModuleList(DualAttentionLayer(cfg, cross) for _ in range(cfg.layers))
        if cfg.use_lid:
            d_l = lid_encoder.cfg.hidden
            self.projection = nn.Sequential(Linear(d_l, d), nn.GELU(), Linear(d, d))
        self.apply(lambda mod: init_weights(mod, cfg.init_std))
        # after apply(): the LID's encoder keeps its pre-trained weights
        self.lid = LatentIntentDistiller(lid_encoder, cfg.k, cfg.m, cfg.init_std) if cfg.use_lid else None

    def intents(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """Projected intents T_D, (B, m, d), or None without the LID."""
        if self.lid is None:
            return None
        return self.projection(self.lid(items, lengths))

    def reason(self, items: torch.Tensor, lengths: torch.Tensor, intents: torch.Tensor | None,
               views: int = 1) -> torch.Tensor:
        """The IDR: h_u (views * B, d) for each row given its (possibly masked) intents, with
        `views` copies of the B rows (ICR's views: intents (views * B, m, d), view-major). The
        embeddings' LayerNorm, the same for every view, is computed once; each copy then draws
        its own dropout mask, as `views` separate rows would."""
        if intents is not None and self.cfg.fusion == "concat":  # the intents are tokens: one row per view
            items, lengths, views = items.repeat(views, 1), lengths.repeat(views) + intents.shape[1], 1
            x = torch.cat([intents, self.item_emb(items)], dim=1)
            intents = None
        else:
            x = self.item_emb(items)
        x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))[None]
        h = self.emb_drop(self.emb_ln(x).repeat(views, 1, 1))
        lengths = lengths.repeat(views)
        for layer in self.layers[:-1]:
            h = layer(h, intents)
        # only h_u is read: the last layer runs at each row's last item alone
        return self.layers[-1].forward_at(h, intents, lengths - 1) if self.layers else last_position(h, lengths)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        items, lengths, target = batch.items, batch.lengths, batch.target
        t_d = self.intents(items, lengths)
        W = self.item_emb.weight
        if t_d is None or not self.icr_active:
            return {"loss": linear_cross_entropy(self.reason(items, lengths, t_d), W, target)}
        B = items.shape[0]
        # both masked views in one pass over a doubled batch
        views = torch.cat([dropout(t_d, self.cfg.p_mask), dropout(t_d, self.cfg.p_mask)])
        h = self.reason(items, lengths, views, views=2)
        ce = linear_cross_entropy(h, W, target.repeat(2))
        cl = info_nce(h[:B], h[B:], self.cfg.tau)
        return {"loss": ce + self.cfg.cl_weight * cl, "ce": ce.detach(), "cl": cl.detach()}

    @property
    def icr_active(self) -> bool:
        return self.lid is not None and self.cfg.use_icr and self.cfg.cl_weight > 0

    @property
    def output_views(self) -> int:
        return 2 if self.icr_active else 1

    def scores(self, batch) -> torch.Tensor:
        h = self.reason(batch.items, batch.lengths, self.intents(batch.items, batch.lengths))
        return item_scores(h, self.item_emb.weight)
