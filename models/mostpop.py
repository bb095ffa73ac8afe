"""MostPop: every item scored by how often it occurs in the training data, the same scores for
every user. No personalisation and nothing learned: the popularity floor of Table 2.

What is counted: every item of every user's training part, i.e. the items before the
validation target (the whole history, not only the most recent `max_len` that the other
models read), in the split the trainer passes to `on_epoch_start`. Validation and test targets
are never counted, so the test ranking uses nothing the other models could not see. With noise
in the training histories (`noise_on` "all" or "train") the noisy training data is what is
counted, as it is what the other models train on.

Counts live in a buffer, not a parameter: they are part of the state dict, so the trainer's
best-epoch copy, resume checkpoints and the weights a run keeps all carry them (a reloaded
model scores without its data), and no optimizer touches them. Before the first
`on_epoch_start` every count is zero and every item ties (metrics near zero, like an untrained
model). The shared trainer gives a model without trainable parameters an optimizer over an
empty group and one epoch only (harness/train.py: a second epoch would count the same items
again); `loss` is a constant zero that `backward()` accepts, so the training loop (and
`harness bench`) run unchanged.

Ties are not broken. Items with equal counts are indistinguishable to MostPop, and the harness
ranks every model by the same pessimistic rule (harness/metrics.py: an item scoring as high as
the target ranks above it), so a target is placed last among the items as popular as it: a
floor, never flattered by how ties happen to fall. A tie-break by item id would not be neutral:
the prepared datasets number items by first appearance reading each user's whole sequence
(harness/data/fetch.py, as S3-Rec numbers them), validation and test targets included, so low
ids lean towards items that are popular in the held-out part. And a tie only moves a metric
when it involves the target inside the top 20 (Recall@k only when it straddles rank k); near the
top of the list the counts are large and rarely equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.base import SequentialRecommender


@dataclass
class MostPopConfig:
    """Nothing to set: the counts are a function of the training data alone."""


class MostPop(SequentialRecommender):
    layout = "sequence"  # the fewest training rows: its loss reads no batch

    def __init__(self, cfg: MostPopConfig, n_items: int):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        self.register_buffer("counts", torch.zeros(n_items + 1))  # column 0 (padding) stays 0

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, data=None) -> None:
        """Count every item of each user's training part (`data.train_len` items from the start
        of its sequence, before the validation and test targets)."""
        if data is None:
            return
        counts = np.bincount(training_items(data), minlength=self.n_items + 1)
        if counts.size != self.n_items + 1:
            raise ValueError(f"MostPop: the data has item ids up to {counts.size - 1}, the model {self.n_items}")
        counts[0] = 0
        self.counts.copy_(torch.from_numpy(counts))

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """Nothing to learn: a zero (a leaf that requires grad, so `loss.backward()` is a no-op
        rather than an error)."""
        return {"loss": torch.zeros((), device=self.counts.device, requires_grad=True)}

    def scores(self, batch) -> torch.Tensor:
        """The training counts, the same row for every user (B, n_items + 1)."""
        return self.counts.expand(batch.items.shape[0], -1)


def training_items(data) -> np.ndarray:
    """The item ids of every user's training part, flat: the first `train_len` items of each
    user's sequence in `data` (a `harness.data.split.LeaveOneOut`)."""
    lengths = np.diff(data.offsets)
    pos = np.arange(data.flat.size) - np.repeat(data.offsets[:-1], lengths)  # index inside its sequence
    return data.flat[pos < np.repeat(np.maximum(data.train_len, 0), lengths)]
