"""ICSRec (Qin et al., WSDM 2024, "Intent Contrastive Learning with Cross Subsequences for
Sequential Recommendation"): a SASRec encoder trained on subsequences with next-item CE plus a
coarse-grained (same-target subsequences) and a fine-grained (k-means intents) contrastive term.

Followed the authors' code (`QinHsiu/ICSRec`: `src/main.py`, `src/trainers.py` ICSRecTrainer,
`src/models.py` SASRecModel + KMeans, `src/modules.py`, `src/datasets.py` DS +
Generate_tag + RecWithContrastiveLearningDataset, `src/scripts/*.sh`):
- Samples: DS(.) cuts every user's sequence into subsequences, one per training target, the
  history cut to the last `max_len` items. That is exactly the harness's "prefix" layout (one
  row per (history, target) sample), so the layout is "prefix" and batch_size counts samples
  as the code's batches of subsequences do.
- Encoder: the code's SASRecModel = post-LN BERT blocks (the harness's PostLNBlock), GELU FFN
  of 4 x hidden, LayerNorm(eps 1e-12) + dropout on item + position embeddings, N(0, 0.02)
  init, dropout 0.5 / attention dropout 0.5 (all scripts), hidden 64, 2 layers x 2 heads.
  The code left-pads every row to max_len, so the last item always has position max_len - 1;
  here rows are right-padded and `positions_from_end` gives item j of an n-item history
  position max_len - n + j, the same numbers (causal attention: padding never reaches a real
  position, so the states are the code's).
- Next-item loss: full-softmax CE of the last position's state against the (tied) item
  embeddings (`predict_full` + CrossEntropyLoss on target_pos_1[:, -1]), rec_weight 1.
- Coarse-grained term (`cicl_loss`): for every training subsequence, another subsequence with
  the same target and a different history (Generate_tag's target -> histories table); when
  there is none, one with the same history, i.e. the row itself (`random.choice` over a list
  whose histories all equal its own). Both the row and its partner are encoded again (fresh
  dropout, separate from the CE pass, as the code calls the model three times) and their
  last-position states form an NT-Xent pair over the 2B views of the batch, similarity = dot
  product / temperature (`--sim dot`, `--temperature 1.0`: the defaults; no script changes them).
- Fine-grained term (`ficl_loss`): every epoch, in eval mode, the last-position states of all
  training samples are clustered into `intent_num` intents (faiss: niter 20, nredo 5, seed 1,
  max_points_per_centroid 4096; the centroids are L2-normalised afterwards). In training, each
  view's detached state is assigned to its nearest (raw) centroid and NT-Xent pairs the state
  with that normalised centroid; the term is the sum over the two views.
- False-negative masking (`--f_neg`, on in every script): in both terms, any other view with
  the same label (target item for the coarse term, intent for the fine term) is dropped from
  the negatives instead of only the row itself and its positive.
- loss = CE + lambda_0 * coarse + beta_0 * fine. Defaults from scripts/beauty.sh and
  sports.sh: intent_num 256, lambda_0 0.3, beta_0 0.1 (toys.sh: 1024, 0.2, 0.1).

Choices (where the code gave no usable answer or this harness differs):
- Which partner: the code's loop keeps the *last* different-history subsequence in file order,
  so a sample has the same partner in every epoch. Here the partner is drawn uniformly among
  all training samples with the same target and a different history, anew at every use
  (torch's RNG on the model's device: deterministic for a seed). Same positives, no dependence
  on file order.
- Finding partners: `on_epoch_start` builds (once per split) an index of the "prefix" samples
  sorted by (target, history id); histories are identified by two independent random linear
  hashes mod 2^31-1 and 2^31-19 (collision odds ~2^-62 per pair), so a row of a batch, which
  carries no sample id, finds its own history's block by hashing its items. A batch draws
  partners with a few searchsorted calls on the model's device and gathers their histories from
  a device copy of the item array: no per-sample Python and no I/O (Amazon Toys: 109k
  samples).
- Without an index (on_epoch_start never called with a split, e.g. in unit tests) partners
  come from the batch itself: a random other row with the same target and a different
  history, else the row itself. Without centroids (same case) the fine term is 0; with
  beta_0 = 0 no clustering is done at all.
- k-means: models/kmeans.py (torch, k-means++ seeding) instead of faiss; best of `kmeans_redo`
  runs by inertia, fit on at most 4096 points per centroid (a seeded subsample, as faiss),
  seed `kmeans_seed` (1, as the code) every epoch. The clustering pass uses the split's own
  rows in length order (in the run's precision: the trainer calls on_epoch_start inside its
  autocast), k-means and the nearest-centroid look-ups in fp32 always, and leaves the global
  RNG state untouched.
- The three encoder passes (CE view, the row's contrastive view, the partner) run as one set
  of 3B rows (separate dropout masks per row, as separate calls give), packed side by side
  (`models.base.pack`: attention within each row only, positions from each row's own end): the
  partners' lengths are unrelated to the batch's, and packed ~98% of the encoded tokens are
  real (1.8x less CPU time per Toys batch than 8 length groups).
- Contrastive similarities and softmaxes are computed in fp32 (dot products / 1.0 of LayerNorm
  outputs reach ~64, too coarse in bf16).
- The code's CE also scores an unused mask-token column (item_size = max_item + 2); here the
  columns are padding + items, as every model of the harness.

Slow start, as ICLRec's: the fine-grained term dominates the first epochs (curves and the time
split of an epoch: docs/results.md). The code runs up to 300 epochs with patience 40
(src/main.py), so studies/icsrec.toml gives it patience 40 (`[trainer]`): `harness tune` and
every experiment (compare, ...) stop its runs after 40 epochs without gain unless --patience is
given, and the tables' captions say so. `harness train` takes the flags as given (default 10).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import (NON_NEGATIVE, POSITIVE, Dropout, OneOf, Packed, Range, SequentialRecommender, at_least,
                         init_weights, pack)
from models.kmeans import assign, kmeans
from models.losses import item_scores, linear_cross_entropy
from models.sasrec import PostLNBlock, SASRecConfig

_P1, _P2 = 2147483647, 2147483629  # primes < 2^31: products with item ids stay inside int64
_HASH_SEED = 12345
_CLUSTER_BATCH = 2048
_MAX_POINTS_PER_CENTROID = 4096  # faiss's default subsampling for k-means training
_LENGTH_GROUPS = 8  # last_states_by_length (the reference the packed pass is tested against)


@dataclass
class ICSRecConfig(SASRecConfig):
    # hidden 64, inner 256, 2 layers x 2 heads, dropout 0.5 / 0.5, max_len 50: SASRecConfig
    positions_from_end: bool = True  # the code left-pads: last item at position max_len - 1
    intent_num: int = 256  # k-means clusters (fine-grained intents)
    kmeans_iters: int = 20
    kmeans_redo: int = 5  # faiss nredo: keep the run with the lowest inertia
    kmeans_seed: int = 1
    lambda_0: float = 0.3  # weight of the coarse-grained (same-target) contrastive term
    beta_0: float = 0.1  # weight of the fine-grained (intent) contrastive term
    temperature: float = 1.0
    sim: str = "dot"  # "dot" or "cos"
    f_neg: bool = True  # false-negative masking: same-label views are not negatives

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "intent_num": at_least(1), "kmeans_iters": at_least(0), "kmeans_redo": at_least(1), "lambda_0": NON_NEGATIVE,
        "beta_0": NON_NEGATIVE, "temperature": POSITIVE, "sim": OneOf(("dot", "cos"))}


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float, sim: str = "dot",
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent over the 2B views [a; b]: view i's positive is its counterpart in the other half.
    Negatives: every other view, or with `labels` (B,) every view with a different label."""
    B = a.shape[0]
    with torch.autocast(a.device.type, enabled=False):
        z = torch.cat([a.float(), b.float()])
        if sim == "cos":
            z = F.normalize(z, dim=-1)
        s = z @ z.T / tau
        idx = torch.arange(2 * B, device=z.device)
        other = (idx + B) % (2 * B)
        pos = s[idx, other]
        if labels is not None:
            lab = labels.repeat(2)
            keep = lab[:, None] != lab[None, :]
        else:
            keep = ~torch.eye(2 * B, dtype=torch.bool, device=z.device)
            keep[idx, other] = False
        logits = torch.cat([pos[:, None], s.masked_fill(~keep, float("-inf"))], dim=1)
        return F.cross_entropy(logits, torch.zeros(2 * B, dtype=torch.long, device=z.device))


@dataclass
class _PartnerIndex:
    """The training ("prefix") samples of one split, for same-target partner lookups."""
    flat: torch.Tensor  # the split's item array
    start: torch.Tensor  # (N,) first item of each sample's history in `flat`
    length: torch.Tensor  # (N,) history length
    target: torch.Tensor  # (N,)
    w1: torch.Tensor  # (max_len,) hash weights
    w2: torch.Tensor
    hashes: torch.Tensor  # sorted distinct history hashes; a history's id is its rank here
    keys: torch.Tensor  # (N,) target * H + history id, sorted
    order: torch.Tensor  # (N,) sample ids in key order
    n_hist: int  # H

    def to(self, device: torch.device) -> "_PartnerIndex":
        return _PartnerIndex(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()})

    def gather(self, samples: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded histories (items, lengths) of the given sample ids."""
        start, length = self.start[samples], self.length[samples]
        width = int(length.max()) if width is None else width
        pos = torch.arange(width, device=samples.device)
        real = pos[None] < length[:, None]
        idx = (start[:, None] + pos[None]).clamp(max=len(self.flat) - 1)
        return torch.where(real, self.flat[idx], 0), length


def _hash_rows(items: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Combined hash of right-padded histories (B, L) (padding is 0 and adds nothing)."""
    L = items.shape[1]
    h1 = ((items * w1[:L]) % _P1).sum(1) % _P1
    h2 = ((items * w2[:L]) % _P2).sum(1) % _P2
    return h1 * _P2 + h2


def build_partner_index(data, max_len: int) -> _PartnerIndex:
    """Index the split's "prefix" training samples by (target, history)."""
    rows = data.train_rows("prefix")
    flat = np.asarray(data.flat, dtype=np.int64)
    start, length = rows.start.astype(np.int64), rows.length.astype(np.int64)
    target = flat[start + length]
    width = max(max_len, int(data.max_len), int(length.max(initial=1)))
    rng = np.random.default_rng(_HASH_SEED)
    w1 = rng.integers(1, _P1, width, dtype=np.int64)
    w2 = rng.integers(1, _P2, width, dtype=np.int64)
    h1 = np.zeros(len(start), np.int64)
    h2 = np.zeros(len(start), np.int64)
    for j in range(int(length.max(initial=0))):
        real = length > j
        item = np.where(real, flat[np.minimum(start + j, len(flat) - 1)], 0)
        h1 = (h1 + item * w1[j] % _P1) % _P1
        h2 = (h2 + item * w2[j] % _P2) % _P2
    combined = h1 * _P2 + h2
    hashes, hist_id = np.unique(combined, return_inverse=True)
    n_hist = max(len(hashes), 1)
    keys = target * n_hist + hist_id.reshape(-1)
    order = np.argsort(keys, kind="stable")
    t = torch.from_numpy
    return _PartnerIndex(flat=t(flat), start=t(start), length=t(length), target=t(target), w1=t(w1),
                         w2=t(w2), hashes=t(hashes), keys=t(keys[order]), order=t(order), n_hist=n_hist)


def same_target_partners(batch, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One same-target, different-history partner per row of `batch` (items, lengths, target):
    (items, lengths, sample id), the id -1 where the row is its own partner. Drawn from `index`
    (`build_partner_index` of the training split, on the batch's device) when given, else from
    the batch (ids then index the batch's rows)."""
    items, lengths, target = batch.items, batch.lengths, batch.target
    B, device = items.shape[0], items.device
    if index is None:
        same_target = target[:, None] == target[None, :]
        same_hist = (lengths[:, None] == lengths[None, :]) & (items[:, None, :] == items[None, :, :]).all(-1)
        cand = same_target & ~same_hist
        pick = torch.rand(B, B, device=device).masked_fill(~cand, -1.0).argmax(1)
        has = cand.any(1)
        pick = torch.where(has, pick, torch.arange(B, device=device))
        return items[pick], lengths[pick], torch.where(has, pick, -1)
    ix = index
    H = ix.n_hist
    h = _hash_rows(items, ix.w1, ix.w2)
    hid = torch.searchsorted(ix.hashes, h).clamp(max=len(ix.hashes) - 1)
    found = ix.hashes[hid] == h  # False only for rows that are not samples of this split
    key = target * H + hid
    g0 = torch.searchsorted(ix.keys, target * H)
    g1 = torch.searchsorted(ix.keys, (target + 1) * H)
    s0 = torch.searchsorted(ix.keys, key)
    s1 = torch.where(found, torch.searchsorted(ix.keys, key + 1), s0)  # own-history block
    others = (g1 - g0) - (s1 - s0)
    has = others > 0
    r = (torch.rand(B, device=device) * others).long().clamp(max=(others - 1).clamp(min=0))
    pos = g0 + r + (r >= s0 - g0).long() * (s1 - s0)
    sample = torch.where(has, ix.order[pos.clamp(max=len(ix.order) - 1)], 0)
    width = int(torch.where(has, ix.length[sample], lengths).max())
    p_items, p_len = ix.gather(sample, max(width, items.shape[1]))
    own = F.pad(items, (0, p_items.shape[1] - items.shape[1]))
    p_items = torch.where(has[:, None], p_items, own)[:, :width]
    p_len = torch.where(has, p_len, lengths)
    return p_items, p_len, torch.where(has, sample, -1)


class ICSRec(SequentialRecommender):
    layout = "prefix"

    def __init__(self, cfg: ICSRecConfig, n_items: int):
        super().__init__()
        if cfg.sim not in ("dot", "cos"):
            raise ValueError(f"sim must be 'dot' or 'cos', got {cfg.sim!r}")
        self.cfg, self.n_items = cfg, n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.emb_drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(PostLNBlock(cfg) for _ in range(cfg.layers))
        self.apply(lambda m: init_weights(m, cfg.init_std))
        # set by on_epoch_start; plain attributes (not state): recomputed, never checkpointed
        self._split = None
        self._index: _PartnerIndex | None = None
        self.centroids: torch.Tensor | None = None  # raw k-means centroids, for assignment
        self.intents: torch.Tensor | None = None  # the same, L2-normalised: the positives

    # ------------------------------------------------------------------------------ encoder
    def _embed(self, items: torch.Tensor, lengths: torch.Tensor, packed: Packed | None) -> torch.Tensor:
        if packed is None:
            L = items.shape[1]
            pos = torch.arange(L, device=items.device)[None].expand(items.shape[0], L)
            seq_len = lengths[:, None]
        else:
            pos, seq_len = packed.positions, packed.lengths
        if self.cfg.positions_from_end:
            pos = pos + (self.cfg.max_len - seq_len)
        pos = pos.clamp(0, self.cfg.max_len - 1)  # only padding (or over-long rows) is clamped
        return self.emb_drop(self.emb_ln(self.item_emb(items) + self.pos_emb(pos)))

    def encode(self, items: torch.Tensor, lengths: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """States of every position; `packed`: the rows hold several sequences each (`pack`).
        Training and scoring read only each sequence's last state (`encode_last`); this full pass
        is the reference that one is tested against."""
        x = self._embed(items, lengths, packed)
        mask = None if packed is None else packed.mask
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x

    def encode_last(self, items: torch.Tensor, lengths: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """Each sequence's state after its last item: `encode` read there, with the last block
        run at those positions alone (`PostLNBlock.forward_at`). Why: every term of ICSRec reads
        only these states, and Toys' histories are a few items long, so the last block's FFN,
        LayerNorms and queries at the other positions were over half of that block's work."""
        x = self._embed(items, lengths, packed)
        if packed is None:
            rows, cols, starts = torch.arange(items.shape[0], device=items.device), lengths - 1, None
        else:
            rows, cols = packed.last_row, packed.last_col
            starts = cols - lengths + 1
        if not self.blocks:
            return x[rows, cols]
        mask = None if packed is None else packed.mask
        for block in self.blocks[:-1]:
            x = block(x, attn_mask=mask)
        return self.blocks[-1].forward_at(x, rows, cols, starts)

    def user_vector(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.encode_last(items, lengths)

    def last_states(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`user_vector` of every row, in one pass over the rows packed side by side (`pack`):
        the partners come from anywhere, so their lengths are unrelated to the batch's (which the
        trainer buckets); packed, ~98% of the encoded tokens are real. The same states as one
        row each (tested against `last_states_by_length` and the full `encode`)."""
        packed = pack(items, lengths)
        return self.encode_last(packed.items, lengths, packed)

    def last_states_by_length(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`user_vector` of every row, computed over `_LENGTH_GROUPS` groups of rows of similar
        length, each cut to its own longest row. The batch's own rows are short when the
        trainer buckets them, but their same-target partners come from anywhere, so one padded
        pass ran every row at ~max_len (Toys: 3.2x slower per batch). Causal attention with right
        padding makes the states the same as one pass gives."""
        order = torch.argsort(lengths, stable=True)
        states = []
        for idx in order.tensor_split(min(_LENGTH_GROUPS, len(order))):
            width = int(lengths[idx].max())
            states.append(self.user_vector(items[idx, :width], lengths[idx]))
        return torch.cat(states)[torch.argsort(order)]

    def scores(self, batch) -> torch.Tensor:
        return item_scores(self.user_vector(batch.items, batch.lengths), self.item_emb.weight)

    # ------------------------------------------------------------------------------ partners
    def partners(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One same-target, different-history partner per row (`same_target_partners`), from the
        split's index after on_epoch_start, else from the batch."""
        if self._index is not None and self._index.flat.device != batch.items.device:
            self._index = self._index.to(batch.items.device)
        return same_target_partners(batch, self._index)

    # ------------------------------------------------------------------------------ epochs
    @torch.no_grad()
    def on_epoch_start(self, epoch: int, data=None) -> None:
        if data is None:
            return
        device = self.item_emb.weight.device
        if self._split is not data or self._index is None:
            self._split = data
            self._index = build_partner_index(data, self.cfg.max_len).to(device)
        if self.cfg.beta_0 > 0:  # the intents serve only the fine-grained term
            self._cluster(device)

    @torch.no_grad()
    def _cluster(self, device: torch.device) -> None:
        """k-means over the last-position states of all training samples, in eval mode."""
        ix = self._index
        was_training = self.training
        self.eval()
        try:
            order = torch.argsort(ix.length.cpu(), stable=True).to(device)  # little padding
            reps = []
            for i in range(0, len(order), _CLUSTER_BATCH):
                items, lengths = ix.gather(order[i:i + _CLUSTER_BATCH])
                reps.append(self.user_vector(items, lengths).float())
        finally:
            self.train(was_training)
        x = torch.cat(reps)
        k = min(self.cfg.intent_num, len(x))
        fit_on = x
        if len(x) > k * _MAX_POINTS_PER_CENTROID:
            gen = torch.Generator().manual_seed(self.cfg.kmeans_seed)
            fit_on = x[torch.randperm(len(x), generator=gen)[: k * _MAX_POINTS_PER_CENTROID].to(device)]
        best, best_inertia = None, float("inf")
        for run in range(max(self.cfg.kmeans_redo, 1)):
            centroids, _ = kmeans(fit_on, k, self.cfg.kmeans_iters, seed=self.cfg.kmeans_seed + run)
            inertia = float(assign(fit_on, centroids)[1].sum())
            if inertia < best_inertia:
                best, best_inertia = centroids, inertia
        self.centroids = best
        self.intents = F.normalize(best, dim=1)

    # ------------------------------------------------------------------------------ loss
    def loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        items, lengths = batch.items, batch.lengths
        B = items.shape[0]
        zero = items.new_zeros((), dtype=torch.float)
        if cfg.lambda_0 == 0 and cfg.beta_0 == 0:
            ce = linear_cross_entropy(self.user_vector(items, lengths), self.item_emb.weight, batch.target)
            return {"loss": ce, "ce": ce.detach(), "coarse_cl": zero, "fine_cl": zero}
        p_items, p_len, _ = self.partners(batch)
        W = max(items.shape[1], p_items.shape[1])
        own = F.pad(items, (0, W - items.shape[1]))
        views = torch.cat([own, own, F.pad(p_items, (0, W - p_items.shape[1]))])
        view_len = torch.cat([lengths, lengths, p_len])
        h = self.last_states(views, view_len)
        rec, v1, v2 = h[:B], h[B:2 * B], h[2 * B:]
        ce = linear_cross_entropy(rec, self.item_emb.weight, batch.target)
        coarse = nt_xent(v1, v2, cfg.temperature, cfg.sim, batch.target if cfg.f_neg else None)
        fine = zero
        if self.intents is not None:
            centroids, intents = self.centroids.to(h.device), self.intents.to(h.device)
            fine = sum(self._fine(v, centroids, intents) for v in (v1, v2))
        loss = ce + cfg.lambda_0 * coarse + cfg.beta_0 * fine
        return {"loss": loss, "ce": ce.detach(), "coarse_cl": coarse.detach(), "fine_cl": fine.detach()}

    def _fine(self, v: torch.Tensor, centroids: torch.Tensor, intents: torch.Tensor) -> torch.Tensor:
        intent_id, _ = assign(v.detach().float(), centroids)
        return nt_xent(v, intents[intent_id], self.cfg.temperature, self.cfg.sim,
                       intent_id if self.cfg.f_neg else None)
