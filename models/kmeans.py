"""Torch k-means for the intent-based baselines (ICLRec, ICSRec cluster sequence
representations every epoch; their code uses faiss, which this project does not need).

Lloyd's algorithm with k-means++ seeding on whatever device the vectors live on. Distances
are computed in chunks so a few hundred thousand vectors x 256 centroids fit in memory.
Empty clusters are re-seeded with the points farthest from their centroids, so all k
centroids stay in use (faiss does the same kind of split).
"""
from __future__ import annotations

import torch


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # ||x||^2 - 2 x.c + ||c||^2, clamped: the expansion can dip below zero by rounding
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp_min_(0)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centroid, squared distance to it) for every row of x."""
    idx, dist = [], []
    for start in range(0, len(x), chunk):
        d = _sq_dist(x[start:start + chunk], centroids)
        best = d.min(1)
        idx.append(best.indices)
        dist.append(best.values)
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of x (n, d) into k groups; returns (centroids (k, d), assignment (n,)).
    Deterministic for a seed. k larger than n is clipped to n."""
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    x = x.float()
    n = len(x)
    k = min(k, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++ seeding on a sample (seeding on all points costs k passes over the data)
    pool = x[torch.randperm(n, generator=gen)[: min(n, 64 * k)].to(x.device)]
    centroids = pool[torch.randint(len(pool), (1,), generator=gen).item()][None]
    closest = _sq_dist(pool, centroids).squeeze(1)
    for _ in range(1, k):
        weights = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1 / len(pool))
        pick = torch.multinomial(weights.cpu(), 1, generator=gen).item()
        centroids = torch.cat([centroids, pool[pick][None]])
        closest = torch.minimum(closest, _sq_dist(pool, pool[pick][None]).squeeze(1))
    for _ in range(iters):
        labels, dist = assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        centroids = sums / counts.clamp_min(1)[:, None]
        if len(empty):
            far = dist.topk(len(empty)).indices
            centroids[empty] = x[far]
    labels, _ = assign(x, centroids)
    return centroids, labels
