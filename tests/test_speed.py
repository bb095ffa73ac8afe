"""Restructured computations give what the straightforward ones give: the fast CPU dropout
(same distribution), attention spelled out for its dropout (same math as SDPA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.base import Dropout, attention, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.8])
def test_keep_mask_is_bernoulli(p):
    torch.manual_seed(0)
    n = 400_000
    keep = keep_mask((n,), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # neighbours (the two halves of one 64-bit draw) are independent
    k = keep.float()
    corr = ((k[0::2] - k.mean()) * (k[1::2] - k.mean())).mean() / k.var()
    assert abs(corr.item()) < 0.01


def test_keep_mask_follows_the_seed_and_odd_sizes():
    torch.manual_seed(3)
    a = keep_mask((7, 5, 3), 0.5, torch.device("cpu"))
    torch.manual_seed(3)
    b = keep_mask((7, 5, 3), 0.5, torch.device("cpu"))
    assert a.shape == (7, 5, 3) and torch.equal(a, b)


def test_dropout_is_inverted_dropout():
    torch.manual_seed(0)
    x = torch.randn(300, 200, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, kept.float() / 0.7)
    assert dropout(x, 0.3, training=False) is x
    m = Dropout(0.3).eval()
    assert m(x) is x and m.p == 0.3
    assert dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_spelled_out_attention_is_sdpa(causal, masked):
    """With a dropout rate too small to drop anything, the dropout branch is SDPA's math."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
        mask[0, ..., 4:] = False
    got = attention(q, k, v, attn_mask=mask, dropout_p=1e-12, is_causal=causal and mask is None)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
