"""What the shared trainer needs from a model, and the transformer pieces the models share.

A model is a torch module with two methods:
- `loss(batch) -> dict[str, Tensor]`: its own training objective; key "loss" is minimised,
  other keys (e.g. "ce", "cl") are logged.
- `scores(batch) -> Tensor (B, n_items + 1)`: a score for every item id (column 0 is padding
  and is never ranked) given each row's history.
and a class attribute `layout` ("sequence" or "prefix", see harness/data/split.py) saying how
it wants its training samples laid out. `on_epoch_start(epoch, data)` is an optional hook for
models that recompute something from the training split each epoch (ICLRec's k-means intents):
`data` is the in-memory `harness.data.split.LeaveOneOut`; the hook may iterate its
`train_batches(...)` but must not keep the trainer's RNG state. `output_views` says how many
rows per training sample the loss scores against every item (2 for IGR-SR's two ICR views), so
`harness bench` counts the output layer's FLOPs without knowing any model. Models do no I/O.

A config class declares the values each field accepts once, in `RANGES` (field -> `Range` or
`OneOf`), and which must be a multiple of another in `MULTIPLE_OF`; subclasses add to their
parents'. The harness checks them (harness/config.py `check_range`) for `--param` values, study
files' fixed values and search ranges, and experiment grids, before anything is built or trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.losses import item_scores, linear_cross_entropy


@dataclass(frozen=True)
class Range:
    """The numbers a config field accepts: `low`/`high` bounds (None: unbounded), each closed
    unless `*_open`."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def requirement(self) -> str:
        """What a single value must be: ">= 1", "> 0", "in [0, 1)"."""
        if self.high is None and self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None and self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return f"in {self}"

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _num(self.low)
        high = "inf" if self.high is None else _num(self.high)
        return (f"{'(' if self.low_open or self.low is None else '['}{low}, "
                f"{high}{')' if self.high_open or self.high is None else ']'}")


@dataclass(frozen=True)
class OneOf:
    """The strings a config field accepts."""
    choices: tuple[str, ...]

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def requirement(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def __str__(self) -> str:
        return "{" + ", ".join(repr(c) for c in self.choices) + "}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def at_least(n: int | float) -> Range:
    return Range(low=n)


POSITIVE = Range(low=0, low_open=True)  # temperatures, epsilons: > 0
NON_NEGATIVE = Range(low=0)  # loss weights, noise, std: >= 0
RATE = Range(low=0, high=1, high_open=True)  # dropout rates: [0, 1)
PROBABILITY = Range(low=0, high=1)  # [0, 1]


def declared(config_cls: type, what: str = "RANGES") -> dict[str, Any]:
    """A config class's `RANGES` (or `MULTIPLE_OF`), its parents' first, its own over them."""
    out: dict[str, Any] = {}
    for klass in reversed(config_cls.__mro__):
        out.update(vars(klass).get(what, {}))
    return out


@dataclass
class TransformerConfig:
    """What every transformer model of the harness shares (SASRec's recipe as RecBole sets it):
    width, FFN width, heads, dropout on the blocks and on attention weights, history length,
    LayerNorm epsilon and init std. Each model's config extends it with its own fields (layer
    counts included: LARES counts pre-block and core layers instead of one stack)."""

    hidden: int = 64
    inner: int = 256
    heads: int = 2
    dropout: float = 0.5
    attn_dropout: float = 0.5
    max_len: int = 50
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "hidden": at_least(1), "inner": at_least(1), "heads": at_least(1), "dropout": RATE, "attn_dropout": RATE,
        "max_len": at_least(1), "layer_norm_eps": POSITIVE, "init_std": NON_NEGATIVE}
    # every attention splits the width between its heads
    MULTIPLE_OF: ClassVar[dict[str, str]] = {"hidden": "heads"}


class SequentialRecommender(nn.Module):
    layout: str = "sequence"

    def loss(self, batch) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def scores(self, batch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, data=None) -> None:
        pass

    @property
    def output_views(self) -> int:
        return 1


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for linear and embedding weights, zero biases, unit LayerNorm (as RecBole)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


# ---------------------------------------------------------------------------------- dropout
_KEEP_BITS = 31  # a mask element keeps its value when a uniform 31-bit integer >= p * 2^31


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask (bool) from 31-bit uniform integers, two per 64-bit draw.

    Why: torch's CPU `bernoulli_` draws one generator call per element (about 10 ns each), a
    fifth of an IGR-SR step with dropout 0.5 everywhere; 64-bit integer draws split in two are
    ~7x faster. Same distribution (p resolved to 2^-31, finer than the 24-bit uniform floats
    `bernoulli_` compares against), from another stream of the same seeded generator."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_()  # 63 uniform bits
    r = bits.view(torch.int32)[:n].bitwise_and_(0x7FFFFFFF)
    return r.ge_(round(p * (1 << _KEEP_BITS))).view(shape).bool()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout` (inverted: kept values scaled by 1/(1-p)), with `keep_mask` on a CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    scale = torch.empty((), dtype=x.dtype, device=x.device).fill_(1.0 / (1.0 - p))
    return x * keep_mask(x.shape, p, x.device).to(x.dtype).mul_(scale)


class Dropout(nn.Dropout):
    """nn.Dropout with the fast CPU mask (same p attribute, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# ---------------------------------------------------------------------------- CPU bf16 shapes
def _cpu_bf16(device: torch.device) -> bool:
    return device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def padded_rows(m: int) -> int:
    """`m` rounded up to a multiple of 8 below 256, above on a grid of 16 steps per power of two:
    at most 1/16 more rows (3% on average), and under 200 row counts in all up to 2^17."""
    step = max(8, 1 << max(0, m.bit_length() - 5))
    return -(-m // step) * step


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; under a CPU bf16 autocast, with its rows (every leading dimension flattened)
    padded with zeros to `padded_rows`. The same values for the real rows.

    Why: a CPU bf16 matmul runs through oneDNN, which compiles and caches a kernel for every
    new shape, and each cached kernel holds about 1 MB. The rows of a linear layer are batch
    rows x history length, which vary from batch to batch and epoch to epoch (a "sequence"
    layout batch holds as many users as make ~256 samples): unpadded, a SASRec epoch brought
    ~1,200 new linear-layer matmul shapes, every epoch more, and the process grew by 80-260 MB
    per 60 batches. Padded, they are a fixed few hundred, for at most 1/16 more rows."""
    if not _cpu_bf16(x.device):
        return F.linear(x, weight, bias)
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    mp = padded_rows(m)
    if mp == m:
        return F.linear(x, weight, bias)
    x2 = F.pad(x.reshape(m, x.shape[-1]).to(torch.bfloat16), (0, 0, 0, mp - m))
    return F.linear(x2, weight, bias)[:m].view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear through `linear` (the same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention`. On a CPU: with attention dropout, the same math spelled
    out so that the dropout mask is `keep_mask`'s (the fused kernel has no dropout on a CPU and
    falls back to this very computation with `bernoulli_`); without, bf16 inputs are attended
    in fp32. `attn_mask`: bool, True = attend."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    if dropout_p == 0.0:
        if q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        # torch's CPU flash-attention kernel is several times slower in bf16 than in fp32 (its
        # backward most: IGR-SR's frozen LID, trained through for its prefix/intent tokens)
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                               is_causal=is_causal)
        return y.to(q.dtype)
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return dropout(torch.softmax(s, dim=-1), dropout_p).to(v.dtype) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention (fused qkv). Causal by default: rows are right-padded, so no
    real position ever attends to padding and no extra mask is needed. Bidirectional models
    pass causal=False and a key mask (True at real positions)."""

    def __init__(self, d: int, heads: int, attn_dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"hidden size {d} is not divisible by {heads} heads")
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = Linear(d, 3 * d)
        self.out = Linear(d, d)

    def forward(self, x: torch.Tensor, causal: bool = True, key_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attn_mask` (B, 1, L, L) bool, True = attend, replaces both `causal` and `key_mask`
        (packed rows: several sequences side by side, each attending to itself only)."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        mask = attn_mask if attn_mask is not None else None if key_mask is None else key_mask[:, None, None, :]
        y = attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, L, d))

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   starts: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The causal attention's output (T, d) at the positions (rows[i], cols[i]) only: what
        `forward(x)[rows, cols]` gives, with queries made at those positions alone (keys and
        values at every position; each query sees its row up to its column). `starts`: packed
        rows (`pack`), each query sees its own sequence only, from column starts[i]. `prefix`
        (1, k, d): every row begins with these k tokens, not in `x` and seen by every query
        (their keys and values made once; see `forward_prefixed`).

        Where rows have few queries each (B * Q <= 2T for at most Q per row: IGR-SR's one per
        row, SASRec's targets in long windows, the LID's m intents), a row's queries are set side
        by side, (B, Q, d), and attend to their own row's keys, instead of each query to a copy
        of its row's keys, whose backward (an accumulating scatter of T copies of (L, d)) cost
        more than the attention. Packed rows (`starts`) hold many short sequences, each with a
        query: there the copies cost less than Q mostly masked slots per row. With one query per
        row in row order the two draw the same attention dropout mask."""
        B, L, d = x.shape
        H, T = self.heads, rows.shape[0]
        w, b = self.qkv.weight, self.qkv.bias
        slot, Q = _slots(rows, B)
        grouped = B * Q <= 2 * T
        qt = linear(x[rows, cols], w[:d], b[:d])
        k, v = linear(x, w[d:], b[d:]).view(B, L, 2, H, d // H).permute(2, 0, 3, 1, 4)
        col = torch.arange(L, device=x.device)
        keep = col <= cols[:, None]
        if starts is not None:
            keep &= col >= starts[:, None]
        if grouped:  # (B, Q) query slots; an empty one attends to column 0 alone (finite, unread)
            q = qt.new_zeros(B, Q, d).index_put((rows, slot), qt)
            keep = (col == 0).expand(B, Q, L).index_put((rows, slot), keep)
        else:  # (T, 1) queries, each with a copy of its row's keys
            q, keep, k, v = qt[:, None], keep[:, None], k.index_select(0, rows), v.index_select(0, rows)
        if prefix is not None:
            kp, vp = linear(prefix, w[d:], b[d:]).view(1, -1, 2, H, d // H).permute(2, 0, 3, 1, 4)
            n = k.shape[0]
            k, v = torch.cat([kp.expand(n, -1, -1, -1), k], 2), torch.cat([vp.expand(n, -1, -1, -1), v], 2)
            keep = torch.cat([keep.new_ones(*keep.shape[:2], prefix.shape[1]), keep], -1)
        p = self.attn_dropout if self.training else 0.0
        y = attention(q.view(*q.shape[:2], H, d // H).transpose(1, 2), k, v, attn_mask=keep[:, None], dropout_p=p)
        y = y.transpose(1, 2).reshape(*q.shape[:2], d)
        return self.out(y[rows, slot] if grouped else y[:, 0])

    def forward_prefixed(self, xp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The causal attention over rows that all begin with the same k tokens `xp` (1, k, d),
        at the positions of `x` (B, L, d) that follow them: `forward(cat([xp.expand(B, k, d), x],
        1))[:, k:]`, with the prefix's keys and values made once (not once per row). No
        attention dropout (the caller is in eval mode: rows sharing a prefix would share its
        masks). At chosen positions only: `forward_at(..., prefix=xp)`."""
        B, L, d = x.shape
        H, k = self.heads, xp.shape[1]
        w, b = self.qkv.weight, self.qkv.bias
        kp, vp = linear(xp, w[d:], b[d:]).view(1, k, 2, H, d // H).permute(2, 0, 3, 1, 4)
        q, kx, vx = self.qkv(x).view(B, L, 3, H, d // H).permute(2, 0, 3, 1, 4)
        keys = torch.cat([kp.expand(B, -1, -1, -1), kx], dim=2)
        values = torch.cat([vp.expand(B, -1, -1, -1), vx], dim=2)
        col = torch.arange(L, device=x.device)
        seen = torch.cat([torch.ones(L, k, dtype=torch.bool, device=x.device), col <= col[:, None]], dim=-1)
        y = attention(q, keys, values, attn_mask=seen)  # all the prefix, causal after it
        return self.out(y.transpose(1, 2).reshape(B, L, d))


def _slots(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """Each entry's rank among the entries of its row (rows in any order), and the most
    entries any row has."""
    counts = torch.bincount(rows, minlength=n_rows)
    order = torch.argsort(rows, stable=True)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(rows.shape[0], device=rows.device) - first[rows[order]]
    return slot, int(counts.max()) if rows.numel() else 0


class CrossAttention(nn.Module):
    """Queries from the sequence, keys and values from a short set of context vectors."""

    def __init__(self, d: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.q = Linear(d, d)
        self.kv = Linear(d, 2 * d)
        self.out = Linear(d, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        h = self.heads
        q = self.q(x).view(B, L, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, L, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(d, inner), Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class NextItemModel(SequentialRecommender):
    """A causal encoder (`encode(items) -> (B, L, d)`) scored against the tied item embeddings:
    full-softmax CE at every position that has a target, and the last position for ranking."""

    layout = "sequence"
    item_emb: nn.Embedding

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, batch) -> dict[str, torch.Tensor]:
        h = self.encode(batch.items)
        has_target = batch.targets > 0
        return {"loss": linear_cross_entropy(h[has_target], self.item_emb.weight, batch.targets[has_target])}

    def scores(self, batch) -> torch.Tensor:
        return item_scores(last_position(self.encode(batch.items), batch.lengths), self.item_emb.weight)


@dataclass
class Packed:
    """Right-padded rows (N, W) packed side by side into rows of width W: `items` (R, W),
    `positions` (R, W) counted from each sequence's first item, `lengths` (R, W) the length of
    each token's sequence (0 at padding), `mask` (R, 1, W, W) causal inside each sequence only,
    and each sequence's last token at (`last_row`, `last_col`)."""
    items: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    last_row: torch.Tensor
    last_col: torch.Tensor


_PACKED_ROW_MULTIPLE = 8  # packed rows are ~50 tokens wide: at most ~3% padding, a few shapes


def pack(items: torch.Tensor, lengths: torch.Tensor) -> Packed:
    """First-fit-decreasing packing of sequences into rows as wide as the longest one.

    Why: contrastive partners (LARES's, ICSRec's) are other users' prefixes, a few hundred rows
    of very different lengths; padded (even in length groups) a third of their positions were
    padding, and the many small groups ran the encoder as many small matmuls. Packed, one pass
    over ~W-wide rows does it. Exact: every token attends only to its own sequence's earlier tokens
    and positions restart per sequence, so each state is the one its own right-padded row gives
    (a padding token attends to itself alone, to stay finite; nothing reads it). Under a CPU bf16
    autocast the row count is rounded up to a multiple of 8 with rows of padding alone."""
    device = items.device
    W = max(int(lengths.max()), 1)
    lens = lengths.tolist()
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    fill: list[int] = []
    row, start = [0] * len(lens), [0] * len(lens)
    for i in order:
        n = lens[i]
        r = next((j for j, f in enumerate(fill) if f + n <= W), len(fill))
        if r == len(fill):
            fill.append(0)
        row[i], start[i] = r, fill[r]
        fill[r] += n
    # CPU bf16 matmuls compile a oneDNN kernel per new shape (models.losses._row_multiple); the
    # number of packed rows differs in nearly every batch, so round it up with empty rows
    R = -(-len(fill) // _PACKED_ROW_MULTIPLE) * _PACKED_ROW_MULTIPLE if _cpu_bf16(device) else len(fill)
    row_t = torch.tensor(row, device=device)
    start_t = torch.tensor(start, device=device)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=device), lengths)  # sequence of each real token
    first = torch.cumsum(lengths, 0) - lengths
    j = torch.arange(len(seq), device=device) - first[seq]  # position inside its sequence
    flat = row_t[seq] * W + start_t[seq] + j
    packed_items = items.new_zeros(R * W)
    packed_items[flat] = items[seq, j]
    positions = torch.zeros(R * W, dtype=torch.long, device=device)
    positions[flat] = j
    seq_len = torch.zeros(R * W, dtype=torch.long, device=device)
    seq_len[flat] = lengths[seq]
    segment = torch.full((R * W,), -1, dtype=torch.long, device=device)
    segment[flat] = seq
    segment = segment.view(R, W)
    col = torch.arange(W, device=device)
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    mask = (same & (col[None, :, None] >= col[None, None, :])) | torch.eye(W, dtype=torch.bool, device=device)
    return Packed(packed_items.view(R, W), positions.view(R, W), seq_len.view(R, W), mask[:, None], row_t,
                  start_t + lengths - 1)


def last_position(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The state after each row's last real item (rows are right-padded)."""
    return h[torch.arange(h.shape[0], device=h.device), lengths - 1]


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over the batch: row i of `a` should match row i of `b` (cosine / tau). In fp32
    outside any autocast: cosines / a small tau are logits whose bf16 rounding would swamp the
    differences between near neighbours."""
    with torch.autocast(a.device.type, enabled=False):
        logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / tau
        return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))

