"""SASRec with full-softmax cross-entropy, built to match RecBole 1.2.1's SASRec.

Followed RecBole (`recbole/model/sequential_recommender/sasrec.py`, `SASRec.yaml`): post-LN
blocks (attention -> dropout -> residual -> LayerNorm; GELU FFN -> dropout -> residual ->
LayerNorm), LayerNorm + dropout on item + position embeddings, N(0, 0.02) init, eps 1e-12,
item embeddings tied with the output layer, CE over all item ids. Right-padded rows with
absolute positions 0..n-1 from the start of the (truncated) history, as RecBole pads.
Being causal, it trains in the "sequence" layout: all prefixes of a row in one pass, the last
block only at the positions that have a target (`loss`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.base import (Dropout, FeedForward, NextItemModel, OneOf, Range, SelfAttention, TransformerConfig, at_least,
                         init_weights)
from models.losses import linear_cross_entropy


_FEW_TARGETS = 4  # the last block runs at the targets only when under a quarter of the positions have one


@dataclass
class SASRecConfig(TransformerConfig):
    layers: int = 2

    RANGES: ClassVar[dict[str, Range | OneOf]] = {"layers": at_least(1)}


class PostLNBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.hidden, cfg.heads, cfg.attn_dropout)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden, cfg.inner)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal, or bidirectional over the real positions when given a key mask (BERT4Rec), or
        as `attn_mask` (B, 1, L, L) says (packed rows, `models.base.pack`)."""
        x = self.ln1(x + self.drop(self.attn(x, causal=key_mask is None, key_mask=key_mask, attn_mask=attn_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   starts: torch.Tensor | None = None) -> torch.Tensor:
        """The causal block's output (T, d) at the positions (rows[i], cols[i]) only:
        `forward(x)[rows, cols]`, with the FFN, LayerNorms and attention queries computed there
        alone (nothing at a position depends on later positions' outputs of the same block).
        `starts`: packed rows, as `SelfAttention.forward_at`."""
        x = self.ln1(x[rows, cols] + self.drop(self.attn.forward_at(x, rows, cols, starts)))
        return self.ln2(x + self.drop(self.ffn(x)))

    def forward_prefixed(self, xp: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None,
                         cols: torch.Tensor | None = None):
        """The block over rows that all begin with the same k tokens `xp` (1, k, d), in eval mode:
        `forward(cat([xp.expand(B, k, d), x], 1))` as (its prefix part (1, k, d), the rest (B, L, d)),
        the prefix computed once (causal: it sees only itself, so it is the same in every row).
        With `rows`/`cols`: the rest at those positions only (T, d), and no prefix part."""
        if self.training:
            raise RuntimeError("forward_prefixed shares the prefix across rows: eval mode only (no dropout)")
        if rows is not None:
            x = self.ln1(x[rows, cols] + self.attn.forward_at(x, rows, cols, prefix=xp))
            return self.ln2(x + self.ffn(x))
        x = self.ln1(x + self.attn.forward_prefixed(xp, x))
        return self.forward(xp), self.ln2(x + self.ffn(x))


class SASRec(NextItemModel):

    def __init__(self, cfg: SASRecConfig, n_items: int):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(PostLNBlock(cfg) for _ in range(cfg.layers))
        self.apply(lambda m: init_weights(m, cfg.init_std))

    def item_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """Item + position embeddings before the input LayerNorm, (B, L, d)."""
        pos = torch.arange(items.shape[1], device=items.device)
        return self.item_emb(items) + self.pos_emb(pos)[None]

    def encode_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Input LayerNorm + dropout, then the causal blocks."""
        x = self.emb_drop(self.emb_ln(x))
        for block in self.blocks:
            x = block(x)
        return x

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        return self.encode_inputs(self.item_inputs(items))

    def encode_at(self, items: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """`encode(items)[rows, cols]` (T, d), the last block run at those positions only."""
        return self.encode_inputs_at(self.item_inputs(items), rows, cols)

    def encode_inputs_at(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """`encode_inputs(x)[rows, cols]` (T, d), the last block run at those positions only."""
        x = self.emb_drop(self.emb_ln(x))
        if not self.blocks:
            return x[rows, cols]
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].forward_at(x, rows, cols)

    def encode_prefixed_at(self, xp: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                           cols: torch.Tensor) -> torch.Tensor:
        """`encode_inputs_at(cat([xp.expand(B, k, d), x], 1), rows, cols + k)` (T, d) for rows
        that all begin with the same k input tokens `xp` (1, k, d), in eval mode: the shared
        prefix runs through the blocks once, not once per row (IGR-SR's frozen LID, whose k
        learned prefix tokens come first in every row and see only each other)."""
        if self.training:
            raise RuntimeError("encode_prefixed_at shares the prefix across rows: eval mode only (no dropout)")
        if not self.blocks or xp.shape[1] == 0:
            return self.encode_inputs_at(torch.cat([xp.expand(x.shape[0], -1, -1), x], 1), rows, cols + xp.shape[1])
        xp, x = self.emb_ln(xp), self.emb_ln(x)
        for block in self.blocks[:-1]:
            xp, x = block.forward_prefixed(xp, x)
        return self.blocks[-1].forward_prefixed(xp, x, rows, cols)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """CE at every position with a target, as `NextItemModel.loss`; the last block runs only
        at those positions. Why: the loss reads no other state, and a long user's windows are
        50-item rows with one or two targets each (on Toys 9% of the targets, 62% of the
        positions), so the last block's FFN, LayerNorms and queries elsewhere were wasted work.
        Only where targets are few (under 1 position in `_FEW_TARGETS`): in short rows with a
        target nearly everywhere the extra gathers cost more than they save (measured on Toys)."""
        rows, cols = torch.nonzero(batch.targets > 0, as_tuple=True)
        if _FEW_TARGETS * rows.numel() > batch.targets.numel():
            return super().loss(batch)
        h = self.encode_at(batch.items, rows, cols)
        return {"loss": linear_cross_entropy(h, self.item_emb.weight, batch.targets[rows, cols])}
