"""Torch k-means (models/kmeans.py): recovers planted clusters, deterministic, no empty clusters."""
from __future__ import annotations

import pytest
import torch

from models.kmeans import assign, kmeans


def planted(n_per: int = 200, k: int = 5, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 10
    truth = torch.arange(k).repeat_interleave(n_per)
    return centers[truth] + torch.randn(k * n_per, d, generator=g), truth


def test_recovers_planted_clusters():
    x, truth = planted()
    centroids, labels = kmeans(x, 5, iters=20, seed=1)
    assert centroids.shape == (5, 8) and labels.shape == truth.shape
    # each planted cluster maps to exactly one found cluster and vice versa
    pairs = {(int(t), int(l)) for t, l in zip(truth, labels)}
    assert len(pairs) == 5 and len({l for _, l in pairs}) == 5


def test_deterministic_and_no_empty_clusters():
    x, _ = planted(n_per=20, k=3)
    c1, l1 = kmeans(x, 16, seed=3)
    c2, l2 = kmeans(x, 16, seed=3)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.bincount(l1, minlength=16).min() > 0  # more clusters than planted: none left empty
    idx, dist = assign(x, c1, chunk=7)  # chunking does not change the answer
    assert torch.equal(idx, l1) and (dist >= 0).all()


def test_clips_k_and_rejects_empty_input():
    x = torch.randn(4, 2)
    centroids, labels = kmeans(x, 10)
    assert len(centroids) == 4 and sorted(labels.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.empty(0, 3), 2)


def test_assign_is_the_plain_nearest_centroid_in_fp32_even_under_bf16_autocast():
    """The chunked, in-place distances are the straightforward formula's numbers, whatever the
    chunk, and an enclosing bf16 autocast (a training step) does not round them. To fp32
    rounding, not bit for bit: the BLAS may pick another kernel (another summation order) for a
    7-row chunk than for 5,000 rows, as it does on some CPUs."""
    from models.kmeans import _sq_dist, assign

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g) * 3
    c = torch.randn(40, 16, generator=g)
    plain = _sq_dist(x, c).min(1)
    for chunk in (7, 4096, 65536):
        idx, dist = assign(x, c, chunk=chunk)
        assert torch.equal(idx, plain.indices)
        torch.testing.assert_close(dist, plain.values, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, dist = assign(x, c)
        _, labels = kmeans(x, 8, iters=5, seed=3)
    assert dist.dtype == torch.float32 and torch.equal(idx, plain.indices)
    assert torch.equal(labels, kmeans(x, 8, iters=5, seed=3)[1])
