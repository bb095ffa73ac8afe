"""ICLRec (Chen et al., WWW 2022, "Intent Contrastive Learning for Sequential Recommendation"):
a SASRec encoder trained with the next-item loss, a sequence-level contrastive term between two
augmented views, and an intent contrastive term against k-means centroids recomputed every
epoch.

Followed the authors' code (`salesforce/ICLRec`, its "Hybrid" contrast type that every
script runs):
- `src/trainers.py` (ICLRecTrainer.iteration): before each training epoch, with the model in
  eval mode, encode every user's training sequence, mean-pool the last-layer outputs over time
  (`seq_representation_type` "mean") and k-means them (`num_intent_clusters` 256, faiss
  niter 20, nredo 5, seed = args.seed). Per batch: next-item loss on the original sequence;
  the batch rows' mean-pooled training-mode outputs (detached) pick their nearest centroid
  (L2, the raw centroids), and the loss uses that centroid L2-normalised
  (`src/models.py` KMeans.train/query). Loss = rec + cf_weight * seq_cl + intent_cf_weight *
  intent_cl, both weights 0.1 (scripts/run_beauty.sh, run_toys.sh), warm_up_epoches 0.
- `src/modules.py` NCELoss (used by both terms): plain dot products / temperature (1.0; no
  cosine), the other view's row as the positive, in-batch negatives from both views (2B - 2
  per anchor), symmetric over the two sides. PCLoss: the mean of NCE(view 1, intents) and
  NCE(view 2, intents), intents = each row's assigned (normalised) centroid. The optional
  false-negative handling (`--de_noise`, off in every script) drops same-label pairs from the
  negatives: `de_noise` here, off by default.
- Sequence-level views: `seq_representation_instancecl_type` defaults to "concatenate" (the
  scripts keep it): the flattened (positions x hidden) outputs of the left-padded sequence.
- `src/data_augmentation.py` Random: each view independently picks crop / mask / reorder
  uniformly, per sequence. Crop: int(tao * n) consecutive items (one item if that is 0)
  starting uniformly in [0, n - int(tao * n) - 1]; tao 0.2. Mask: int(gamma * n) positions
  chosen without replacement set to id 0; gamma 0.7. Reorder: int(beta * n) consecutive items
  shuffled, start uniform in [0, n - int(beta * n) - 1]; beta 0.2. `src/main.py` defaults:
  hidden 64, 2 layers x 2 heads, dropout 0.5 / 0.5, GELU, inner 4 x hidden, max length 50,
  N(0, 0.02) init, lr 1e-3, batch 256. `src/models.py` SASRecModel: id-0 keys are masked out
  of attention (so masked items are not attended to, but their positions still give outputs).

Choices and deviations:
- Next-item loss: full-softmax cross-entropy at every position with a target (this harness's
  objective for every model); the code uses BCE with one sampled negative per position.
- Backbone: the harness's SASRec (post-LN blocks, right-padded rows, positions 0..n-1 from the
  oldest item); the code left-pads to 50 slots and numbers the slots, so its last item is
  always at position 49. 2 layers as the code's default (run_toys.sh uses 3, run_beauty.sh 1:
  `layers` is in the study's space).
- Samples: the harness's "sequence" layout (one row per user over its first <= max_len
  training positions, plus a row per later sample of a longer history). The code has one row
  per user (the last 50 training items). Augmentations act on each row (the code augments
  the untruncated training sequence, then keeps its last 50 items), and a batch holds
  `batch_size` *samples*, so the in-batch negatives are this batch's rows (fewer than the
  code's 256 users), some of them possibly windows of the same user.
- Augmentations are vectorised over the padded batch with torch's RNG; the code's
  off-by-one ranges (crop/reorder never start at n - len) are kept. Masked items become id 0
  and are excluded as attention keys, as in the code; each position also attends to itself
  (the code's additive -1e4 mask makes a query with no visible key attend uniformly to all
  slots, padding and future included; that is not reproduced).
- Pooling ignores padding: "mean" averages a view's positions < its length (masked positions
  included, as the code averages all slots; the code's mean also includes the left-padding
  slots' outputs). "concatenate" lays each row into a frame of max_len slots aligned at its
  last item, padding slots zero (the code concatenates the padding slots' outputs too).
  `instance_representation` can be set to "mean" (it is in the study's space: with
  concatenation at temperature 1 the dot products reach thousands and the sequence term,
  even at weight 0.1, outweighs the cross-entropy early on, as in the code).
- The two views are encoded once and serve both terms (the code runs the same augmented
  views through the encoder twice, once per term, with fresh dropout).
- Clustering data: each user's training input (the last <= max_len items before its last
  training target), one row per user, as the code's cluster loader. k-means is models/kmeans.py
  (k-means++ seeding, 20 Lloyd iterations, `kmeans_redo` 5 restarts keeping the lowest
  inertia, as faiss's nredo), seeded from `kmeans_seed` and the epoch with a local generator
  (faiss reuses one seed every epoch). Centroids are a non-persistent buffer.
- de_noise labels: intents for the intent term (as the code); for the sequence term the
  code uses the item after the training sequence (the validation item); here each row's
  last target (`batch.target`), which leaks nothing.
- Contrastive similarities are computed in fp32 (concatenated dot products reach thousands).

Slow start: at the code's contrastive weights (0.1) the first epochs belong to the contrastive
terms and the CE barely moves; with both weights 0 the model is SASRec exactly. The code trains
up to 300 epochs with patience 40 (src/main.py), so studies/iclrec.toml gives it patience 40
(`[trainer]`): `harness tune` and every experiment (compare, ...) stop its runs after 40 epochs
without gain unless --patience is given, and the tables' captions say so. `harness train` takes
the flags as given (default 10). Measured curves: docs/results.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from models.base import NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Range, at_least, attention
from models.kmeans import assign, kmeans
from models.losses import linear_cross_entropy
from models.sasrec import PostLNBlock, SASRec, SASRecConfig

AUGMENTATIONS = ("random", "crop", "mask", "reorder")
REPRESENTATIONS = ("mean", "concatenate")


@dataclass
class ICLRecConfig(SASRecConfig):
    # hidden 64, inner 256, 2 layers x 2 heads, dropout 0.5 / 0.5, max_len 50: SASRecConfig
    num_intents: int = 256
    kmeans_iters: int = 20
    kmeans_redo: int = 5  # faiss nredo: restarts, the lowest inertia kept
    kmeans_seed: int = 1
    cf_weight: float = 0.1  # sequence-level contrastive term
    intent_cf_weight: float = 0.1  # intent contrastive term
    temperature: float = 1.0
    augmentation: str = "random"  # one of AUGMENTATIONS, per view and sequence
    crop_rate: float = 0.2  # tao (eta in the paper)
    mask_rate: float = 0.7  # gamma
    reorder_rate: float = 0.2  # beta
    seq_representation: str = "mean"  # clustering and the intent term
    instance_representation: str = "concatenate"  # the sequence-level term
    de_noise: bool = False
    warm_up_epochs: int = 0  # epochs (counted from 0, as the code) without intents

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "num_intents": at_least(1), "kmeans_iters": at_least(0), "kmeans_redo": at_least(1),
        "cf_weight": NON_NEGATIVE, "intent_cf_weight": NON_NEGATIVE, "temperature": POSITIVE,
        "augmentation": OneOf(AUGMENTATIONS), "crop_rate": PROBABILITY, "mask_rate": PROBABILITY,
        "reorder_rate": PROBABILITY, "seq_representation": OneOf(REPRESENTATIONS),
        "instance_representation": OneOf(REPRESENTATIONS), "warm_up_epochs": at_least(0)}


def _masked_block(block: PostLNBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PostLNBlock.forward with an explicit boolean attention mask (B, 1, L, L)."""
    attn = block.attn
    B, L, d = x.shape
    q, k, v = attn.qkv(x).view(B, L, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    p = attn.attn_dropout if block.training else 0.0
    y = attention(q, k, v, attn_mask=mask, dropout_p=p)
    x = block.ln1(x + block.drop(attn.out(y.transpose(1, 2).reshape(B, L, d))))
    return block.ln2(x + block.drop(block.ffn(x)))


def mean_pool(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each row's outputs over its first `lengths` positions, (B, d)."""
    real = torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None]
    return (h * real[..., None]).sum(1) / lengths[:, None].clamp_min(1)


def concat_pool(h: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The code's "concatenate" on a left-padded frame of `width` slots (>= every length):
    rows aligned at their last item, padding slots zero, flattened to (B, width * d)."""
    B, _, d = h.shape
    src = torch.arange(width, device=h.device)[None] - (width - lengths)[:, None]
    valid = src >= 0
    out = h.gather(1, src.clamp_min(0)[..., None].expand(B, width, d)) * valid[..., None]
    return out.reshape(B, width * d)


def nce(a: torch.Tensor, b: torch.Tensor, tau: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The code's NCELoss: row i of `a` and of `b` are positives; the other rows of both are
    negatives (dot product / tau). With `labels`, pairs with equal labels are not negatives."""
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    same = eye if labels is None else labels[:, None] == labels[None, :]
    sim11 = (a @ a.T / tau).masked_fill(same, float("-inf"))
    sim22 = (b @ b.T / tau).masked_fill(same, float("-inf"))
    sim12 = (a @ b.T / tau).masked_fill(same & ~eye, float("-inf"))
    logits = torch.cat([torch.cat([sim12, sim11], 1), torch.cat([sim22, sim12.T], 1)], 0)
    return F.cross_entropy(logits, torch.arange(2 * n, device=a.device))


class ICLRec(SASRec):
    """SASRec backbone (its `encode` and `scores`) with ICLRec's objective."""

    layout = "sequence"
    cfg: ICLRecConfig

    def __init__(self, cfg: ICLRecConfig, n_items: int):
        for name, value, allowed in (("augmentation", cfg.augmentation, AUGMENTATIONS),
                                     ("seq_representation", cfg.seq_representation, REPRESENTATIONS),
                                     ("instance_representation", cfg.instance_representation, REPRESENTATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        super().__init__(cfg, n_items)
        self.register_buffer("centroids", None, persistent=False)  # (k, d) raw k-means centroids

    # ------------------------------------------------------------------ augmentations
    def augment(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented view of each right-padded row: (items (B, L'), lengths (B,))."""
        cfg = self.cfg
        B, L = items.shape
        dev = items.device
        pos = torch.arange(L, device=dev)
        n = lengths.to(dev)
        nd = n.double()
        views, view_len = [], []
        kinds = ("crop", "mask", "reorder") if cfg.augmentation == "random" else (cfg.augmentation,)
        if "crop" in kinds:
            size = torch.floor(cfg.crop_rate * nd).long()
            start = torch.floor(torch.rand(B, device=dev, dtype=torch.float64) * (n - size)).long()
            size = size.clamp_min(1)
            src = (start[:, None] + pos[None]).clamp_max(L - 1)
            views.append(torch.where(pos[None] < size[:, None], items.gather(1, src), 0))
            view_len.append(size)
        if "mask" in kinds:
            count = torch.floor(cfg.mask_rate * nd).long()
            noise = torch.rand(B, L, device=dev).masked_fill(pos[None] >= n[:, None], 2.0)
            rank = noise.argsort(1).argsort(1)
            views.append(items.masked_fill(rank < count[:, None], 0))
            view_len.append(n)
        if "reorder" in kinds:
            size = torch.floor(cfg.reorder_rate * nd).long()
            start = torch.floor(torch.rand(B, device=dev, dtype=torch.float64) * (n - size)).long()
            window = (pos[None] >= start[:, None]) & (pos[None] < (start + size)[:, None])
            key = torch.where(window, start[:, None] + torch.rand(B, L, device=dev, dtype=torch.float64)
                              * size[:, None], pos[None].double())
            views.append(items.gather(1, key.argsort(dim=1, stable=True)))
            view_len.append(n)
        if len(views) == 1:
            out, out_len = views[0], view_len[0]
        else:
            pick = torch.randint(len(views), (B,), device=dev)
            out = torch.stack(views).gather(0, pick[None, :, None].expand(1, B, L))[0]
            out_len = torch.stack(view_len).gather(0, pick[None])[0]
        return out[:, : int(out_len.max())], out_len

    def encode_views(self, items: torch.Tensor) -> torch.Tensor:
        """Causal encoding in which id-0 items (masked, or padding) are never attended to;
        every position attends to itself, so no query is left without a key."""
        L = items.shape[1]
        pos = torch.arange(L, device=items.device)
        causal = pos[None, :] <= pos[:, None]
        mask = (causal[None] & (items > 0)[:, None, :]) | torch.eye(L, dtype=torch.bool, device=items.device)
        x = self.emb_drop(self.emb_ln(self.item_inputs(items)))
        for block in self.blocks:
            x = _masked_block(block, x, mask[:, None])
        return x

    def _pool(self, h: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
        return mean_pool(h, lengths) if how == "mean" else concat_pool(h, lengths, self.cfg.max_len)

    # ------------------------------------------------------------------ intents
    @property
    def intents_active(self) -> bool:
        return self.centroids is not None and self.cfg.intent_cf_weight > 0

    def on_epoch_start(self, epoch: int, data=None) -> None:
        """k-means over the users' training sequences, encoded in eval mode (harness epochs
        count from 1, the code's from 0)."""
        cfg = self.cfg
        if data is None or cfg.intent_cf_weight == 0 or epoch - 1 < cfg.warm_up_epochs:
            return
        reps = self.sequence_representations(data)
        if len(reps) == 0:
            return
        best, best_inertia = None, float("inf")
        for r in range(max(cfg.kmeans_redo, 1)):
            centroids, _ = kmeans(reps, cfg.num_intents, cfg.kmeans_iters,
                                  seed=cfg.kmeans_seed + 1000 * epoch + r)
            inertia = float(assign(reps, centroids)[1].sum())
            if inertia < best_inertia:
                best, best_inertia = centroids, inertia
        self.centroids = best.to(self.item_emb.weight.device)

    @torch.no_grad()
    def sequence_representations(self, data, batch_size: int = 1024) -> torch.Tensor:
        """Pooled eval-mode outputs of each user's training input (last <= max_len items
        before the last training target), (users with a training sample, d or L * d)."""
        n_in = np.maximum(data.train_len - 1, 0)
        users = np.flatnonzero(n_in > 0)
        length = np.minimum(n_in[users], data.max_len)
        start = data.offsets[users] + n_in[users] - length
        order = np.argsort(length, kind="stable")
        device = self.item_emb.weight.device
        was_training = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                ln, st = length[idx], start[idx]
                pos = np.arange(int(ln.max()))
                real = pos[None] < ln[:, None]
                items = np.where(real, data.flat[np.where(real, st[:, None] + pos[None], 0)], 0)
                items_t = torch.from_numpy(items).to(device)
                h = self.encode(items_t).float()
                out.append(self._pool(h, torch.from_numpy(ln).to(device), self.cfg.seq_representation))
        finally:
            self.train(was_training)
        if not out:
            return torch.empty(0, self.cfg.hidden, device=device)
        reps = torch.cat(out)
        return reps[torch.from_numpy(np.argsort(order, kind="stable")).to(device)]  # user order

    # ------------------------------------------------------------------ objective
    def loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        h = self.encode(batch.items)
        has_target = batch.targets > 0
        ce = linear_cross_entropy(h[has_target], self.item_emb.weight, batch.targets[has_target])
        zero = ce.new_zeros(())
        seq_cl, intent_cl = zero, zero
        use_seq, use_intent = cfg.cf_weight > 0, self.intents_active
        if use_seq or use_intent:
            B = batch.items.shape[0]
            (v1, l1), (v2, l2) = self.augment(batch.items, batch.lengths), self.augment(batch.items, batch.lengths)
            width = max(v1.shape[1], v2.shape[1])
            views = torch.cat([F.pad(v1, (0, width - v1.shape[1])), F.pad(v2, (0, width - v2.shape[1]))])
            view_len = torch.cat([l1, l2])
            hv = self.encode_views(views)
            with torch.autocast(hv.device.type, enabled=False):  # large dot products: fp32
                hv = hv.float()
                if use_seq:
                    z = self._pool(hv, view_len, cfg.instance_representation)
                    labels = batch.target if cfg.de_noise else None
                    seq_cl = nce(z[:B], z[B:], cfg.temperature, labels)
                if use_intent:
                    with torch.no_grad():
                        query = self._pool(h.detach().float(), batch.lengths, cfg.seq_representation)
                        ids, _ = assign(query, self.centroids.float())
                        intents = F.normalize(self.centroids.float()[ids], dim=1)
                    m = self._pool(hv, view_len, cfg.seq_representation)
                    labels = ids if cfg.de_noise else None
                    intent_cl = (nce(m[:B], intents, cfg.temperature, labels)
                                 + nce(m[B:], intents, cfg.temperature, labels)) / 2
        loss = ce + cfg.cf_weight * seq_cl + (cfg.intent_cf_weight * intent_cl if use_intent else 0.0)
        return {"loss": loss, "ce": ce.detach(), "seq_cl": seq_cl.detach(), "intent_cl": intent_cl.detach()}
