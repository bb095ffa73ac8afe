"""Full-ranking metrics from the rank of each user's target among all items.

Ranks are 0-based and pessimistic: every other item scoring at least as high as the target
(ties included) is ranked above it, so a model that scores every item the same gets rank
n_items - 1 and metrics near zero, never near one. Per-user ranks are kept so that any
metric, and paired significance tests over the same users, can be computed later without
re-running the model.
"""
from __future__ import annotations

import numpy as np
import torch

KS = (10, 20)
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in KS)
_RANK_ROWS = 16


def target_ranks(scores: torch.Tensor, target: torch.Tensor,
                 exclude: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Pessimistic 0-based rank of `target` in each row of `scores` (B, n_items + 1).

    Column 0 is the padding id and never ranked. `exclude` = (rows, items) pairs set to -inf
    before ranking (history masking); the target itself is never excluded.
    """
    # One comparison pass over the real items (column 0 is padding): ahead = items scoring at
    # least the target's score, the target itself included, minus one. A NaN compares False, so
    # it never outranks anything; +-inf compare as they are.
    scores = scores.float()
    if exclude is not None:
        scores = scores.clone()
        rows, items = exclude
        keep = items != target[rows]
        scores[rows[keep], items[keep]] = -torch.inf
    t = scores.gather(1, target[:, None])
    # in blocks of rows whose comparison mask stays in cache (3x faster than one pass)
    ahead = torch.empty(scores.shape[0], dtype=torch.int64, device=scores.device)
    for r in range(0, scores.shape[0], _RANK_ROWS):
        ahead[r:r + _RANK_ROWS] = (scores[r:r + _RANK_ROWS, 1:] >= t[r:r + _RANK_ROWS]).sum(1)
    ahead -= 1
    # a target scored -inf or NaN ranks last among the real items
    n_real = scores.shape[1] - 1
    lost = torch.isneginf(t[:, 0]) | torch.isnan(t[:, 0])
    return torch.where(lost, torch.full_like(ahead, n_real - 1), ahead)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(ranks < k))
    for k in ks:
        out[f"ndcg@{k}"] = float(np.mean(per_user_ndcg(ranks, k)))
    return out


def per_user_ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of one held-out target per user: 1/log2(rank + 2) inside the top k, else 0."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def per_user_recall(ranks: np.ndarray, k: int) -> np.ndarray:
    return (np.asarray(ranks) < k).astype(np.float64)
