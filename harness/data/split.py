"""Leave-one-out split and batching (the fixed protocol of ARCHITECTURE.md).

Per user: the last item is the test target, the second-to-last the validation target, and
every prefix of the rest gives a training sample (history -> next item), the history cut to
the most recent `max_len` items.

A training *row* is (start, length, loss_from): the model reads `flat[start : start+length]`
and predicts `flat[start+j+1]` at every position `j >= loss_from`. Two layouts give the very
same set of (history, target) samples:

- "prefix": one row per sample, loss at its last position only (models whose state at a
  position depends on more than the items before it, e.g. IGR-SR's intents or BERT4Rec).
- "sequence": one row per user covering all its prefixes up to `max_len` at once, plus one
  row per sample whose history is longer than `max_len` (loss at the last position). Exact
  for causal models, whose state at position j depends only on items 0..j (SASRec, GRU4Rec);
  the encoder then computes each position once instead of once per prefix.

`batch_size` always counts samples, so both layouts take the same number of optimizer steps.

A layout may ask for every row D times per epoch: `"prefix*10"` is the "prefix" layout with
each row drawn 10 times, the copies shuffled over the epoch's batches like any other rows (a
model that draws something random per row in its loss, BERT4Rec's cloze masks, then sees D
independently masked copies of each sample per epoch: the BERT4Rec authors' `dupe_factor`).
Batches are padded on the right to their own longest row; rows of similar length are batched
together (shuffled within buckets) so little is padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from harness.data.sequences import SequenceData

LAYOUTS = ("sequence", "prefix")


def parse_layout(layout: str) -> tuple[str, int]:
    """("prefix", 1) for "prefix", ("prefix", 10) for "prefix*10" (each row 10 times per epoch)."""
    name, star, count = layout.partition("*")
    if name not in LAYOUTS or (star and not (count.isdigit() and int(count) >= 1)):
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}, optionally *D (D >= 1 copies "
                         "of each row per epoch)")
    return name, int(count) if star else 1


@dataclass
class Batch:
    items: torch.Tensor  # (B, L) item ids, right-padded with 0
    lengths: torch.Tensor  # (B,) number of real items per row
    targets: torch.Tensor  # (B, L) next item where a loss is taken, else 0 (training only)
    target: torch.Tensor  # (B,) the target after the row's last item
    users: torch.Tensor  # (B,) user index

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.items, self.lengths, self.targets, self.target, self.users)))

    @property
    def size(self) -> int:
        return int(self.items.shape[0])


@dataclass
class Rows:
    start: np.ndarray
    length: np.ndarray
    loss_from: np.ndarray
    user: np.ndarray

    @property
    def samples(self) -> np.ndarray:
        return self.length - self.loss_from

    def __len__(self) -> int:
        return len(self.start)


class LeaveOneOut:
    """A dataset split for training and full-ranking evaluation.

    `eval_data`, when given, is another version of the same sequences (same users, lengths
    and validation/test targets, e.g. the clean data beside a noisy copy) whose histories the
    evaluation reads instead: the robustness experiment's "noise in training only" and "noise at
    evaluation only" readings."""

    def __init__(self, data: SequenceData, max_len: int = 50, eval_data: SequenceData | None = None):
        self.data = data
        self.max_len = max_len
        self.n_items = data.n_items
        self.n_users = data.n_users
        self.flat = data.items
        self.offsets = data.offsets
        self.train_len = data.lengths() - 2  # items before the validation target
        self._flat_t = torch.from_numpy(self.flat)
        self._rows: dict[str, Rows] = {}
        self.eval_data = eval_data
        self.eval_flat = data.items if eval_data is None else eval_data.items
        if eval_data is not None:
            last_two = np.concatenate([data.offsets[1:] - 2, data.offsets[1:] - 1])
            if (not np.array_equal(eval_data.offsets, data.offsets) or eval_data.n_items != data.n_items
                    or not np.array_equal(eval_data.items[last_two], data.items[last_two])):
                raise ValueError(f"evaluation data {eval_data.source or '?'} is not a version of "
                                 f"{data.source or 'the training data'}: users, lengths or targets differ")

    @property
    def content_key(self) -> str:
        """What the split's results depend on: the data's content hash, and the evaluation
        data's too when it differs."""
        if self.eval_data is None:
            return self.data.content_hash
        return f"{self.data.content_hash}+eval:{self.eval_data.content_hash}"

    def training_only(self) -> "LeaveOneOut":
        """The split of the training data alone (evaluation reads its own histories)."""
        return self if self.eval_data is None else LeaveOneOut(self.data, self.max_len)

    # ---------------------------------------------------------------- training rows
    def train_rows(self, layout: str) -> Rows:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
        if layout not in self._rows:
            self._rows[layout] = self._make_rows(layout)
        return self._rows[layout]

    def _make_rows(self, layout: str) -> Rows:
        n_targets = np.maximum(self.train_len - 1, 0)  # targets at train indices 1..T-1
        users = np.repeat(np.arange(self.n_users), n_targets)
        first = np.cumsum(n_targets) - n_targets
        t = np.arange(users.size) - np.repeat(first, n_targets) + 1  # target index in the user's sequence
        base = self.offsets[users]
        m = self.max_len
        if layout == "prefix":
            length = np.minimum(t, m)
            return Rows(base + t - length, length, length - 1, users)
        head_users = np.flatnonzero(n_targets > 0)
        head_len = np.minimum(n_targets[head_users], m)
        long = t > m
        lu, lt = users[long], t[long]
        return Rows(
            start=np.concatenate([self.offsets[head_users], self.offsets[lu] + lt - m]),
            length=np.concatenate([head_len, np.full(lu.size, m)]),
            loss_from=np.concatenate([np.zeros(head_users.size, np.int64), np.full(lu.size, m - 1)]),
            user=np.concatenate([head_users, lu]),
        )

    def n_train_samples(self) -> int:
        return int(np.maximum(self.train_len - 1, 0).sum())

    def train_batches(self, layout: str, batch_size: int, rng: np.random.Generator,
                      bucket: int = 64) -> list[Batch]:
        """One epoch of shuffled, length-bucketed batches of about `batch_size` samples (each
        row D times for a layout "NAME*D")."""
        name, copies = parse_layout(layout)
        rows = self.train_rows(name)
        order = rng.permutation(len(rows) * copies) % len(rows)  # copies = 1: one permutation, as ever
        samples = rows.samples[order]
        # buckets of ~`bucket` batches, sorted by length inside: little padding, still random
        chunk = (np.cumsum(samples) - samples) // (batch_size * bucket)
        order = order[np.lexsort((rows.length[order], chunk))]
        samples = rows.samples[order]
        batch_id = (np.cumsum(samples) - samples) // batch_size
        cuts = np.flatnonzero(np.diff(batch_id)) + 1
        groups = np.split(order, cuts)
        rng.shuffle(groups)
        return [self._train_batch(rows, g) for g in groups]

    def _train_batch(self, rows: Rows, idx: np.ndarray) -> Batch:
        start, length, loss_from = rows.start[idx], rows.length[idx], rows.loss_from[idx]
        L = int(length.max())
        pos = np.arange(L)
        real = pos[None, :] < length[:, None]
        gather = np.where(real, start[:, None] + pos[None, :], 0)
        items = np.where(real, self.flat[gather], 0)
        has_loss = real & (pos[None, :] >= loss_from[:, None])
        targets = np.where(has_loss, self.flat[gather + 1], 0)
        target = self.flat[start + length]
        return Batch(*(torch.from_numpy(a) for a in (items, length, targets, target, rows.user[idx])))

    # ---------------------------------------------------------------- evaluation
    def eval_batches(self, split: str, batch_size: int = 1024) -> Iterator[Batch]:
        """Every user once: history -> the validation or test target, rows sorted by length."""
        if split not in ("valid", "test"):
            raise ValueError(split)
        hist_end = self.offsets[1:] - (2 if split == "valid" else 1)  # exclusive end of history
        hist_len = np.minimum(hist_end - self.offsets[:-1], self.max_len)
        order = np.argsort(hist_len, kind="stable")
        for i in range(0, self.n_users, batch_size):
            u = order[i : i + batch_size]
            length = hist_len[u]
            start = hist_end[u] - length
            L = int(length.max())
            pos = np.arange(L)
            real = pos[None, :] < length[:, None]
            items = np.where(real, self.eval_flat[np.where(real, start[:, None] + pos[None, :], 0)], 0)
            target = self.eval_flat[hist_end[u]]
            yield Batch(*(torch.from_numpy(a) for a in
                          (items, length, np.zeros_like(items), target, u)))

    def history_index(self, users: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs of every item a user saw before the split's target (untruncated)."""
        start = self.offsets[users]
        end = self.offsets[users + 1] - (2 if split == "valid" else 1)
        n = end - start
        rows = np.repeat(np.arange(users.size), n)
        first = np.cumsum(n) - n
        idx = np.arange(rows.size) - np.repeat(first, n) + np.repeat(start, n)
        return rows, self.eval_flat[idx]
