"""Restructured computations give what the straightforward ones give: the fast CPU dropout
(same distribution), attention spelled out for its dropout (same math as SDPA), attention at
chosen positions only (the full pass read there), linear layers with their rows padded under
CPU bf16 (the same rows, from a bounded set of matmul shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.base import Dropout, Linear, attention, dropout, keep_mask, linear, padded_rows


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


@pytest.mark.parametrize("layout,grouped", [("one-per-row", True), ("few-per-row", True), ("many-per-row", False),
                                            ("packed", True), ("packed-many", False), ("prefixed", False),
                                            ("prefixed-few", True)])
def test_attention_at_chosen_positions_is_the_full_pass_there(layout, grouped):
    """`SelfAttention.forward_at` (queries grouped by row where rows have few of them, else one
    copy of its row's keys per query) gives `forward(x)[rows, cols]` and its gradients, in both
    of its paths; packed rows attend within their own sequence; a shared prefix is seen by all."""
    from models.base import SelfAttention, _slots, pack

    torch.manual_seed(0)
    attn = SelfAttention(16, 2, attn_dropout=0.0)
    B, L = 6, 9
    x = torch.randn(B, L, 16, requires_grad=True)
    starts = prefix = None
    if layout == "one-per-row":  # grouped, Q = 1
        rows, cols = torch.arange(B), torch.tensor([0, 8, 3, 5, 1, 7])
    elif layout == "few-per-row":  # grouped, Q = 2, rows out of order
        rows, cols = torch.tensor([4, 0, 4, 1, 2, 3, 5, 0, 2]), torch.tensor([6, 2, 1, 8, 0, 3, 4, 7, 5])
    elif layout == "many-per-row":  # copies: 8 queries in one row
        rows, cols = torch.tensor([2] * 8 + [5]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 3])
    if layout in ("one-per-row", "few-per-row", "many-per-row"):
        expected = attn(x)[rows, cols]
        got = attn.forward_at(x, rows, cols)
    elif layout.startswith("packed"):  # many-per-row: five 1-item sequences share a row
        lengths = torch.tensor([5, 2, 1, 4, 3, 1, 2] if layout == "packed" else [5, 5, 5, 1, 1, 1, 1, 1])
        items = torch.zeros(len(lengths), 5, dtype=torch.long)
        p = pack(items, lengths)
        R, W = p.items.shape
        x = torch.randn(R, W, 16, requires_grad=True)
        rows, cols = p.last_row, p.last_col
        starts = cols - lengths + 1
        expected = attn(x, attn_mask=p.mask)[rows, cols]
        got = attn.forward_at(x, rows, cols, starts)
    else:  # a prefix of 3 tokens in front of every row
        prefix = torch.randn(1, 3, 16, requires_grad=True)
        rows = torch.tensor([0, 0, 1, 3, 5, 5, 5] if layout == "prefixed" else [0, 1, 2, 3, 4, 5, 0])
        cols = torch.tensor([0, 4, 8, 2, 1, 6, 7])
        full = attn(torch.cat([prefix.expand(B, -1, -1), x], 1))[:, 3:]
        expected, got = full[rows, cols], attn.forward_at(x, rows, cols, prefix=prefix)
        torch.testing.assert_close(attn.forward_prefixed(prefix, x), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (x.shape[0] * _slots(rows, x.shape[0])[1] <= 2 * rows.shape[0]) == grouped  # the path meant
    probe = torch.randn(got.shape)
    inputs = [x, *attn.parameters()] + ([prefix] if prefix is not None else [])
    for a, b in zip(torch.autograd.grad((got * probe).sum(), inputs), torch.autograd.grad((expected * probe).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_padded_rows_is_a_small_grid_at_most_a_sixteenth_above():
    grid = {padded_rows(m) for m in range(1, 1 << 17)}
    assert len(grid) < 200
    for m in list(range(1, 5000)) + [12_345, 65_537, 100_000]:
        r = padded_rows(m)
        assert r >= m and r % 8 == 0 and padded_rows(r) == r
        assert r - m < 8 or r <= m * 17 / 16


def _bf16_cpu():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("shape", [(5, 7, 16), (37, 16), (300, 16), (2, 0, 16)])
def test_padded_linear_gives_the_unpadded_rows_and_gradients(shape):
    torch.manual_seed(0)
    lin = Linear(16, 24)
    x = torch.randn(*shape, requires_grad=True)
    with _bf16_cpu():
        y = lin(x)
    (y.float() * torch.linspace(-1, 1, 24)).sum().backward()
    got = (y.detach(), x.grad, lin.weight.grad, lin.bias.grad)
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    with _bf16_cpu():
        ref = F.linear(x, lin.weight, lin.bias)
    (ref.float() * torch.linspace(-1, 1, 24)).sum().backward()
    assert y.shape == ref.shape and y.dtype == ref.dtype == torch.bfloat16
    for a, b in zip(got, (ref.detach(), x.grad, lin.weight.grad, lin.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    # outside a CPU bf16 autocast it is F.linear itself
    torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)


def test_cpu_bf16_matmul_shapes_come_from_a_fixed_set():
    """oneDNN compiles and keeps (~1 MB each) a kernel per bf16 matmul shape: over batches of
    every (rows, length), SASRec's linear layers must only ever use grid row counts. (Attention's
    small batched matmuls keep their shapes: the cache's capacity bounds those.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models.sasrec import SASRec, SASRecConfig

    seen: list[tuple[str, tuple]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if func.__name__.split(".")[0] in ("mm", "addmm") and any(
                    t.dtype == torch.bfloat16 for t in tensors):
                seen.append((func.__name__, tuple(tuple(t.shape) for t in tensors)))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(hidden=16, inner=32, max_len=20), n_items=30).train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        B, L = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        items = torch.randint(1, 31, (B, min(L, 20)), generator=gen)
        with Record():
            with _bf16_cpu():
                h = model.encode(items)
            h.float().sum().backward()
    assert seen
    dims = {d for _, shapes in seen for shape in shapes for d in shape}
    assert all(padded_rows(d) == d for d in dims), sorted(d for d in dims if padded_rows(d) != d)
