"""The output layer's loss, fused: full-softmax cross-entropy of `h @ weight.T (+ bias)` with
its gradients made in the same pass, so the (rows x items) logits never go through autograd.

Why: for every model here the output layer (each sample scored against all ~12k items) is most
of an epoch's FLOPs, and `F.cross_entropy` on autograd-tracked logits is memory-bound: it keeps
the logits, upcasts them, writes log-probabilities, and its backward reads and writes the whole
matrix again before the two matmuls. Here a block of rows is scored (one matmul), turned into
probabilities by one native softmax, and at once into the gradient of the logits (softmax minus
the one-hot target), in place; the gradient of h follows while that block is hot, and the
block's logit gradient is kept in the matmul dtype for one gradient-of-weight matmul over all
rows at the end. The backward only scales the stored gradients by the incoming one. Memory: one
row block's fp32 logits (`_BLOCK_BYTES`), the rows' logit gradients in the matmul dtype, and the
gradients of h and weight; nothing of it is held by autograd.

Same loss and gradients as `F.cross_entropy(h @ weight.T + bias, target)` to fp32 rounding
(tests/test_losses.py). Precision: under an enabled autocast (bf16) the matmuls take
bf16 operands and the softmax reads bf16 logits, as autocast's own `linear` +
`cross_entropy` would (whose logit gradient is also rounded to bf16 for the matmuls); the
softmax accumulates in fp32 and every gradient is accumulated in fp32. Without autocast
everything is the inputs' dtype (fp32).
"""
from __future__ import annotations

import torch

_BLOCK_BYTES = 8 << 20  # fp32 bytes of one row block's logits: a block's softmax passes stay in cache
_ROW_MULTIPLE = 64  # row counts of CPU bf16 matmuls are padded to this (see _padded_rows)
_NATIVE_BLOCK_BYTES = 64 << 20  # logits of one matmul before the fused kernel (set_erl_kernel)
_SUB_BYTES = 1 << 20  # fp32 bytes of the step logits whose elementwise passes run together (in L2)
_TINY = 1e-30  # a target probability below this is recomputed from the log-sum-exp (no underflow)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The matmul dtype of the surrounding autocast, else the tensor's own."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _block_rows(n_rows: int, n_items: int, block_rows: int | None, multiple: int = 1) -> int:
    rows = max(1, min(n_rows, block_rows or _BLOCK_BYTES // (4 * max(n_items, 1))))
    return max(multiple, rows // multiple * multiple)


def _row_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """What the row counts of the output layer's matmuls are padded to a multiple of.

    Why: a CPU bf16 matmul runs through oneDNN, which compiles a kernel for every new shape (about
    30 ms on this machine, more than the matmul itself) and keeps a bounded cache of them; the
    number of targets in a batch varies, so unpadded nearly every step compiled new kernels.
    Elsewhere (fp32: MKL; CUDA: cuBLAS) shapes cost nothing and rows are not padded."""
    return _ROW_MULTIPLE if device.type == "cpu" and dtype == torch.bfloat16 else 1


def _target_nll(p_target: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p of each row's target, from the softmax the caller needs anyway for the gradient
    (fp32 `p_target`); where that probability underflowed, from the logits' log-sum-exp."""
    nll = -torch.log(p_target)
    tiny = p_target < _TINY
    if bool(tiny.any()):
        zt = logits[tiny].float()
        nll[tiny] = torch.logsumexp(zt, dim=1) - zt[torch.arange(zt.shape[0], device=zt.device), target[tiny]]
    return nll


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, block_rows, dtype):
        R, N = h.shape[0], weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        hc, wc = h.to(dtype), weight.to(dtype)
        mult = _row_multiple(h.device, dtype)
        R_pad = -(-R // mult) * mult
        if R_pad > R:  # zero rows whose losses and gradients are computed and dropped
            hc = torch.cat([hc, hc.new_zeros(R_pad - R, hc.shape[1])])
            target = torch.cat([target, target.new_zeros(R_pad - R)])
        bc = None if bias is None else bias.to(dtype)
        losses = torch.empty(R_pad, dtype=torch.float32, device=h.device)
        grad_h = torch.empty(R_pad, h.shape[1], dtype=torch.float32, device=h.device) if need_grad else None
        g_all = torch.empty(R_pad, N, dtype=dtype, device=h.device) if need_grad else None
        grad_b = None if bias is None or not need_grad else torch.zeros(N, dtype=torch.float32, device=h.device)
        rows = _block_rows(R_pad, N, block_rows, mult)
        for r0 in range(0, R_pad, rows):
            hr, tr = hc[r0:r0 + rows], target[r0:r0 + rows]
            rr = torch.arange(hr.shape[0], device=h.device)
            z = hr @ wc.T if bc is None else torch.addmm(bc, hr, wc.T)
            # fp32 accumulation inside, result in z's dtype; straight into the stored gradients
            p = torch.softmax(z, dim=1) if g_all is None else torch.softmax(z, 1, out=g_all[r0:r0 + rows])
            losses[r0:r0 + rows] = _target_nll(p[rr, tr].float(), z, tr)
            if need_grad:
                g = p  # d loss_row / d logits = softmax - one-hot, in place
                g[rr, tr] -= 1
                grad_h[r0:r0 + rows] = g @ wc
                if grad_b is not None:
                    grad_b += g[: max(0, min(rows, R - r0))].sum(0, dtype=torch.float32)
        if need_grad:
            # one matmul over all rows (padding rows of hc are 0); d mean / d row = 1 / R
            grad_w = (g_all.T @ hc).float().mul_(1.0 / R)
            grad_h = grad_h[:R].mul_(1.0 / R)
            if grad_b is not None:
                grad_b.mul_(1.0 / R)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return losses[:R].mean()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        # the loss is usually the objective itself (grad_out 1): then the stored gradients are the
        # answer, and a pass over the (items x d) weight gradient is saved (checked on a CPU only,
        # where reading the value costs nothing)
        if not (grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0):
            g = grad_out.float()
            grad_h, grad_w = grad_h * g, grad_w * g
            grad_b = None if grad_b is None else grad_b * g
        return (grad_h.to(dh), grad_w.to(dw), None if grad_b is None else grad_b.to(db), None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, block_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T (+ bias)` (rows x all items) against `target`:
    what `F.cross_entropy(h @ weight.T + bias, target)` gives, fused (see the module docstring).

    h (R, d), weight (N, d) (rows are the scored items, e.g. the tied item embeddings), bias
    (N,) or None, target (R,) indices into weight's rows. `block_rows` fixes the row block
    (tests); by default a block's logits take about 8 MiB."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()) * 0.0
    return _LinearCrossEntropy.apply(h, weight, bias, target, block_rows, _compute_dtype(h))


def item_scores(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`h @ weight.T (+ bias)` in fp32 outside any autocast: the scores items are ranked by.

    Rounded to bf16 (about 3 significant digits), scores tie and swap near the target and a
    pessimistic rank moves down by a different amount per model; ranking must not depend on the
    training precision."""
    with torch.autocast(h.device.type, enabled=False):
        s = h.float() @ weight.float().T
        return s if bias is None else s + bias.float()


_erl_kernel = None  # a fused CPU kernel for the per-row part of ERL's objective, if one was set


def set_erl_kernel(kernel) -> None:
    """Use `kernel(z, target, nll, ew, grad, c, inv)` (harness/native.py: from the step logits z
    (rows, T, N) it writes what the eager formula in `_EnsembleObjective.forward` computes: each
    row's NLL and E_pj[w_j], and into `grad`, if given, each step's logit gradient) for CPU
    logits in fp32 or bf16; None: the eager formula."""
    global _erl_kernel
    _erl_kernel = kernel


class _EnsembleObjective(torch.autograd.Function):
    """ReaRec-ERL's objective from one block of step logits per row; see `ensemble_objective`."""

    @staticmethod
    def forward(ctx, o, weight, target, temperature, kl_weight, dtype):
        B, T, d = o.shape
        N = weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:2])
        h = (o / temperature).reshape(B * T, d).to(dtype)
        wc = weight.to(dtype)
        native = o.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _erl_kernel is not None
        pairs = B * T * (T - 1)
        c = -kl_weight * T / pairs  # d(-kl_weight KL) / d z_j = c p_j (w_j - E_pj[w_j]), below
        # each step's logit gradient, c p_j (w_j - E_pj[w_j]) (the KL's) + (softmax(mean) - one-hot)
        # / (B T) (the CE's, the same for every step), kept in the matmul dtype for the gradient
        # matmuls (rounded as autocast's own backward would round it)
        g_all = torch.empty(B * T, N, dtype=dtype, device=o.device) if need_grad else None
        nll = torch.empty(B, dtype=torch.float32, device=o.device)
        ew_all = torch.empty(B, T, dtype=torch.float32, device=o.device)
        if native:  # one pass per row over its logits, in cache (set_erl_kernel)
            rows = max(1, _NATIVE_BLOCK_BYTES // (T * N * h.element_size()))
        else:  # one matmul per block of rows, its elementwise passes per cache-sized sub-block
            rows = _block_rows(B, T * N, None)
        sub = max(1, _SUB_BYTES // (4 * T * N))
        for b0 in range(0, B, rows):
            nb = min(rows, B - b0)
            zb = (h[b0 * T:(b0 + nb) * T] @ wc.T).view(nb, T, N)  # step logits z_j = o_j W^T / tau
            if native:
                grad = g_all[b0 * T:(b0 + nb) * T].view(nb, T, N) if need_grad else None
                _erl_kernel(zb, target[b0:b0 + nb], nll[b0:b0 + nb], ew_all[b0:b0 + nb], grad, c, 1.0 / (B * T))
                continue
            for s0 in range(b0, b0 + nb, sub):
                ns = min(sub, b0 + nb - s0)
                tb = target[s0:s0 + ns]
                rr = torch.arange(ns, device=o.device)
                z = zb[s0 - b0:s0 - b0 + ns].float()
                zm = z.mean(1)  # the ensemble's logits: the mean of the steps'
                pm = torch.softmax(zm, dim=1)  # CE of the ensemble, from its softmax (also its gradient)
                nll[s0:s0 + ns] = _target_nll(pm[rr, tb], zm, tb)
                # pairwise KL(p_j || sg(p_i)) summed over i != j is E_{p_j}[T z_j - sum_i z_i] (the
                # log-sum-exps cancel) = T E_{p_j}[w_j] with w_j = z_j - mean_i z_i; its gradient
                # through p_j alone is T p_j (w_j - E_pj[w_j]) (scaled by -kl_weight / pairs).
                # In place, fp32 throughout: mixed-dtype elementwise ops are several times slower
                p = torch.softmax(z, dim=2)
                g = z.sub_(zm[:, None]).mul_(p)  # p_j w_j
                ew = g.sum(2, keepdim=True)  # E_pj[w_j]
                ew_all[s0:s0 + ns] = ew[:, :, 0]
                if need_grad:
                    g.addcmul_(p, ew, value=-1.0)  # p_j (w_j - E_pj[w_j])
                    pm[rr, tb] -= 1
                    pm.div_(B * T)
                    torch.add(pm[:, None], g, alpha=c, out=g_all[s0 * T:(s0 + ns) * T].view(ns, T, N))
        ce = nll.mean()
        kl = ew_all.sum() * (T / pairs)
        if need_grad:
            ctx.save_for_backward((g_all @ wc).float(), (g_all.T @ h).float())
        ctx.shape, ctx.temperature, ctx.dtypes = (B, T, d), temperature, (o.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce, kl)
        return ce - kl_weight * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_loss.float()
        do, dw = ctx.dtypes
        grad_o = (grad_h * (g / ctx.temperature)).view(ctx.shape).to(do)
        return grad_o, (grad_w * g).to(dw), None, None, None, None


def ensemble_objective(o: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, temperature: float,
                       kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReaRec-ERL's loss without its (rows x steps x items) autograd graph: returns
    (CE(mean_j z_j) - kl_weight * KL, CE, KL) for step outputs o (B, T, d), step logits
    z_j = o_j @ weight.T / temperature, KL = the mean over rows and ordered step pairs i != j of
    KL(softmax z_j || sg(softmax z_i)). The same values and gradients as building the logits and
    calling `models.rearec.pairwise_kl` (tests/test_losses.py); CE and KL come back detached."""
    return _EnsembleObjective.apply(o, weight, target, temperature, kl_weight, _compute_dtype(o))
