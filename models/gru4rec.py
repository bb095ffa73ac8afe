"""GRU4Rec with full-softmax cross-entropy, built to match RecBole's GRU4Rec.

Followed RecBole (`recbole/model/sequential_recommender/gru4rec.py`, `GRU4Rec.yaml`):
item embedding (64) -> dropout (0.3) -> GRU (hidden 128, 1 layer, no biases, batch-first)
-> dense 128 -> 64 -> dot product with the same item embedding table (tied output), CE over
all item ids (`loss_type: CE`). Init as RecBole: Xavier-normal item embeddings, Xavier-uniform
GRU input and recurrent weights, PyTorch's default init for the dense layer.

Choices:
- Sizes: `embedding` is the width every item is scored in, so it is the harness's fixed
  d = 64 (RecBole's default too); the GRU's hidden size stays RecBole's 128.
- With more than one layer RecBole re-initialises only layer 0's weights; here every layer's
  input and recurrent weights get Xavier-uniform (identical for the default single layer).
- Rows are right-padded and a GRU reads left to right, so the state at position j depends
  only on items 0..j: the model is causal and trains in the "sequence" layout (all prefixes of
  a row in one pass), exactly the per-prefix objective RecBole gets from its data augmentation.
  Padding after the last item never reaches a real position's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.base import RATE, Dropout, Linear, NextItemModel, OneOf, Range, at_least


@dataclass
class GRU4RecConfig:
    embedding: int = 64  # item embedding = output width (the harness's d)
    hidden: int = 128  # GRU state (RecBole's hidden_size)
    layers: int = 1
    dropout: float = 0.3  # on the item embeddings (RecBole's emb_dropout)
    max_len: int = 50  # not used by the GRU; kept so the harness can pass its history length

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "embedding": at_least(1), "hidden": at_least(1), "layers": at_least(1), "dropout": RATE, "max_len": at_least(1)}


class GRU4Rec(NextItemModel):

    def __init__(self, cfg: GRU4RecConfig, n_items: int):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.embedding, padding_idx=0)
        self.emb_drop = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embedding, cfg.hidden, num_layers=cfg.layers, bias=False, batch_first=True)
        self.dense = Linear(cfg.hidden, cfg.embedding)
        nn.init.xavier_normal_(self.item_emb.weight)
        for name, p in self.gru.named_parameters():
            if name.startswith(("weight_ih", "weight_hh")):
                nn.init.xavier_uniform_(p)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L, embedding): the prediction vector after every position."""
        h, _ = self.gru(self.emb_drop(self.item_emb(items)))
        return self.dense(h)
