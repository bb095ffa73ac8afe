"""BERT4Rec: a bidirectional transformer trained with the cloze (masked item) objective.

Followed RecBole (`recbole/model/sequential_recommender/bert4rec.py`, `BERT4Rec.yaml`, and the
masking in `recbole/data/transform.py` MaskItemSequence) and the paper (Sun et al., CIKM 2019):
- Post-LN transformer blocks as RecBole's TransformerEncoder (attention -> dropout -> residual
  -> LayerNorm; GELU FFN -> dropout -> residual -> LayerNorm), bidirectional attention that
  never attends to padding; item + position embeddings -> LayerNorm -> dropout; N(0, 0.02)
  init; RecBole's defaults: hidden 64, inner 256, 2 layers x 2 heads, dropout 0.2 / 0.2,
  eps 1e-12, mask_ratio 0.2, ft_ratio 0.5.
- A mask token with its own embedding row, id n_items + 1 (items are 1..n_items, 0 pads).
- Output: the paper's projection (and the authors' TF code / recent RecBole): dense -> GELU ->
  LayerNorm, then dot products with the (tied) item embeddings plus a per-item output bias;
  full softmax over the item ids 0..n_items (never the mask token; column 0 is padding, kept
  in the softmax as SASRec here and RecBole do, and never ranked).
- Loss only at masked positions (CE averaged over the batch's masked positions).
- RecBole's `ft_ratio`: with probability 0.5 a whole batch masks only each row's last item
  (the fine-tuning sample, the same task as evaluation), else every real position is masked
  independently with probability `mask_ratio`. Padding is never masked.
- Evaluation: the mask token is appended right after the history and its output scores the
  items. When the history already fills `max_len` positions, the oldest item is dropped so the
  mask token still fits the position table.

Which rows it trains on (layout "prefix"): RecBole does not train BERT4Rec on one row per
user: its SequentialDataset augments every sequential model's data into all prefixes, and
MaskItemSequence masks each prefix's history. The harness's fixed protocol is the same for every model
("training samples are all prefixes"), so here each training row is one prefix sample of the
"prefix" layout: its history plus its own next item (a training item; the validation and test
targets are never in a training row), cut to the most recent `max_len` items. Cloze masking
runs on that sequence; the fine-tuning branch masks its last item, i.e. predicts the row's
target from its history, which is exactly the evaluation task. Differences from RecBole, on
purpose: RecBole masks inside the history only (the sample's target is unused, so each user's
last training item is never predicted), here the target is part of the sequence; RecBole keeps
at most int(mask_ratio * max_len) masked labels per row, here every masked position has a
label. The "sequence" layout (one row per user) would be the original paper's per-user
sequences, but its batches count prefixes as samples, and the masked positions per step would
then be ~mask_ratio times fewer than any other model's targets per step.

Two recipes, both enqueued in studies/bert4rec.toml:
- RecBole's (the defaults above): one masked copy of each row per epoch, mask_ratio 0.2,
  dropout 0.2 / 0.2, lr 1e-3.
- The authors' Beauty run (`FeiSun/BERT4Rec`: run_beauty.sh, bert_train/bert_config_beauty_64.json,
  gen_data_fin.py): masked_lm_prob 0.6, hidden dropout 0.5, attention dropout 0.2, lr 1e-4,
  batch 256, width 64, and `dupe_factor` 10: gen_data_fin.py writes 10 copies of each training
  sequence, each with its own random mask, plus one copy with only the last item masked, all
  shuffled into one training file. Here `dupe_factor` = D gives the layout "prefix*D": every
  row D times per epoch, the copies shuffled over the epoch's batches, each masked afresh in
  `loss` (an epoch is then D times as many steps). The authors' last-item copies, 1 in D + 1
  of the instances, are the nearest to ft_ratio = 1 / (D + 1) ~ 0.09 here (a share of batches,
  not of rows). Left as they are: their masking picks exactly round(0.6 * length) positions
  (at most 30) where this one masks each with probability mask_ratio; their BERT AdamW has
  weight decay 0.01, 100 warm-up steps and a linear decay over 400,000 steps; their rows are
  whole user sequences (sliding windows), not prefixes.
Table 2 (`harness compare`, `--params best` by default) takes the best trial of the tuning
study, which runs both recipes first; with no study yet, or `--params paper`, it takes the
first enqueued: RecBole's, the recipe of every BERT4Rec figure in docs/results.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.base import (PROBABILITY, Dropout, Linear, OneOf, Range, SequentialRecommender, TransformerConfig, at_least,
                         init_weights)
from models.losses import item_scores, linear_cross_entropy
from models.sasrec import PostLNBlock


@dataclass
class BERT4RecConfig(TransformerConfig):
    dropout: float = 0.2  # RecBole's BERT4Rec defaults, not SASRec's 0.5
    attn_dropout: float = 0.2
    layers: int = 2
    mask_ratio: float = 0.2
    ft_ratio: float = 0.5  # probability that a batch masks only each row's last item
    # masked copies of each training row per epoch (the authors' dupe_factor; RecBole: 1)
    dupe_factor: int = 1

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "layers": at_least(1), "mask_ratio": Range(low=0, high=1, low_open=True), "ft_ratio": PROBABILITY,
        "dupe_factor": at_least(1)}


def append_token(items: torch.Tensor, lengths: torch.Tensor, token: torch.Tensor,
                 max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put `token` (B,) right after each row's last item, dropping the row's oldest item when
    it would not fit in `max_len` positions. Returns right-padded (B, L') items and lengths."""
    B, L = items.shape
    new_len = torch.clamp(lengths + 1, max=max_len)
    width = min(L + 1, max_len)
    extended = torch.cat([items, torch.zeros_like(items[:, :1])], dim=1)
    extended[torch.arange(B, device=items.device), lengths] = token
    src = (lengths + 1 - new_len)[:, None] + torch.arange(width, device=items.device)[None]
    out = extended.gather(1, src.clamp(max=L))
    out = out.masked_fill(torch.arange(width, device=items.device)[None] >= new_len[:, None], 0)
    return out, new_len


class BERT4Rec(SequentialRecommender):
    layout = "prefix"

    def __init__(self, cfg: BERT4RecConfig, n_items: int):
        super().__init__()
        if cfg.dupe_factor < 1:
            raise ValueError(f"dupe_factor must be at least 1, got {cfg.dupe_factor}")
        self.cfg, self.n_items = cfg, n_items
        # D copies of every row per epoch, each masked afresh in `loss` (harness/data/split.py)
        self.layout = "prefix" if cfg.dupe_factor == 1 else f"prefix*{cfg.dupe_factor}"
        self.mask_token = n_items + 1
        self.item_emb = nn.Embedding(n_items + 2, cfg.hidden, padding_idx=0)  # + the mask token
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(PostLNBlock(cfg) for _ in range(cfg.layers))
        self.head = nn.Sequential(Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                                  nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps))
        self.out_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.apply(lambda m: init_weights(m, cfg.init_std))

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L, d) states of a right-padded row of item ids (mask tokens included)."""
        pos = torch.arange(items.shape[1], device=items.device)
        x = self.emb_drop(self.emb_ln(self.item_emb(items) + self.pos_emb(pos)[None]))
        key_mask = items > 0
        for block in self.blocks:
            x = block(x, key_mask)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of item ids 0..n_items (never the mask token) for states h (..., d), fp32."""
        return item_scores(self.head(h), self.item_emb.weight[: self.n_items + 1], self.out_bias)

    def mask(self, seq: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cloze masking of right-padded rows: (masked input, labels with 0 where no loss)."""
        real = seq > 0
        if torch.rand(()) < self.cfg.ft_ratio:
            chosen = torch.zeros_like(real)
            chosen[torch.arange(seq.shape[0], device=seq.device), lengths - 1] = True
        else:
            chosen = real & (torch.rand(seq.shape, device=seq.device) < self.cfg.mask_ratio)
        return seq.masked_fill(chosen, self.mask_token), torch.where(chosen, seq, 0)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        # the row's full sample: history + its own next item (a training item)
        seq, lengths = append_token(batch.items, batch.lengths, batch.target, self.cfg.max_len)
        masked, labels = self.mask(seq, lengths)
        h = self.encode(masked)
        chosen = labels > 0
        if not chosen.any():  # no position drew a mask (tiny batches only): nothing to learn
            return {"loss": h.sum() * 0.0}
        return {"loss": linear_cross_entropy(self.head(h[chosen]), self.item_emb.weight[: self.n_items + 1],
                                             labels[chosen], bias=self.out_bias)}

    def scores(self, batch) -> torch.Tensor:
        token = torch.full_like(batch.lengths, self.mask_token)
        seq, lengths = append_token(batch.items, batch.lengths, token, self.cfg.max_len)
        h = self.encode(seq)
        return self.logits(h[torch.arange(h.shape[0], device=h.device), lengths - 1])
