"""The fused output-layer cross-entropy is F.cross_entropy (loss and gradients), in fp32 and
under bf16 autocast; ranking stays exact fp32 whatever the training precision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from harness import train as train_mod
from harness.cli import cli
from harness.errors import HarnessError
from harness.train import TrainConfig, evaluate, fit, resolve_precision
from models.losses import item_scores, linear_cross_entropy
from models.sasrec import SASRec, SASRecConfig


def _case(R=37, N=301, d=16, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(R, d, generator=g) * scale).requires_grad_()
    w = (torch.randn(N, d, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(N, generator=g) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, N, (R,), generator=g)
    return h, w, b, t


def _reference(h, w, b, t):
    logits = h @ w.T + (b if b is not None else 0.0)
    return F.cross_entropy(logits, t)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_rows", [None, 1, 5, 37])
@pytest.mark.parametrize("weight", [1.0, 3.0])  # the loss itself (stored gradients returned as they are) or a term of one
def test_fused_ce_equals_cross_entropy_in_fp32(bias, block_rows, weight):
    h, w, b, t = _case(bias=bias)
    params = [h, w] + ([b] if bias else [])
    ref = _reference(h, w, b, t)
    ref_grads = torch.autograd.grad(ref * weight, params)
    got = linear_cross_entropy(h, w, t, bias=b, block_rows=block_rows)
    got_grads = torch.autograd.grad(got * weight if weight != 1.0 else got, params)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6, abs=1e-6)
    for mine, theirs in zip(got_grads, ref_grads):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_fused_ce_backward_twice_accumulates_and_keeps_its_stored_gradients():
    """Returned as they are for a unit incoming gradient, the stored gradients must not be
    changed by autograd's accumulation: a second backward adds the same gradient again."""
    h, w, b, t = _case(bias=True)
    ref_grads = torch.autograd.grad(_reference(h, w, b, t), [h, w, b])
    got = linear_cross_entropy(h, w, t, bias=b)
    got.backward(retain_graph=True)
    got.backward()
    for p, ref in zip([h, w, b], ref_grads):
        torch.testing.assert_close(p.grad, 2 * ref, rtol=1e-5, atol=1e-7)


def test_fused_ce_has_no_underflow_where_the_target_is_far_behind():
    # target logits ~200 below the best: its probability underflows fp32, the loss must not
    h, w, b, t = _case(scale=30.0, bias=False)
    ref = F.cross_entropy((h @ w.T).double(), t)
    got = linear_cross_entropy(h, w, t)
    got = got.detach()
    ref = ref.detach()
    assert torch.isfinite(got) and float(ref) > 50
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("R, block_rows", [(64, None), (70, None), (200, 70)])
def test_fused_ce_under_bf16_autocast_matches_autocast_cross_entropy(R, block_rows):
    """In bf16 it agrees with what plain autocast computes (bf16 logits), to bf16 resolution;
    also when the rows are padded to a multiple of 64 (CPU bf16) and cut into blocks."""
    h, w, b, t = _case(R=R, N=500, d=32, bias=True)
    params = [h, w, b]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w, b), t)
        got = linear_cross_entropy(h, w, t, bias=b, block_rows=block_rows)
    ref_grads = torch.autograd.grad(ref, params)
    got_grads = torch.autograd.grad(got, params)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=5e-3)
    for mine, theirs, p in zip(got_grads, ref_grads, params):
        assert mine.dtype == p.dtype == torch.float32  # fp32 master weights get fp32 gradients
        assert float((mine - theirs).norm() / theirs.norm()) < 2e-2


def test_fused_ce_without_grad_and_with_no_rows():
    h, w, b, t = _case(bias=False)
    with torch.no_grad():
        assert float(linear_cross_entropy(h, w, t)) == pytest.approx(float(_reference(h, w, None, t)), rel=1e-6)
    empty = linear_cross_entropy(h[:0], w, t[:0])
    empty.backward()  # a batch with no target must not break the step
    assert float(empty.detach()) == 0.0


def test_item_scores_are_fp32_inside_bf16_autocast():
    h, w, b, _ = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = item_scores(h, w, b)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, h @ w.T + b)


# ---------------------------------------------------------------------------------- ranking
class _NearTies(torch.nn.Module):
    """Scores 1 + i * 1e-4 for item i: distinct in fp32, but bf16 (8 bits of mantissa) rounds
    runs of ~40 neighbours to one value, where pessimistic ties would push every target down."""

    layout = "sequence"

    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.emb = torch.nn.Parameter(torch.zeros(1))

    def scores(self, batch):
        base = torch.ones(batch.size, 1) + self.emb
        return item_scores(base, (1 + 1e-4 * torch.arange(self.n_items + 1.0))[:, None])


def test_close_scores_are_ranked_exactly_even_inside_bf16_autocast(small_split):
    model = _NearTies(small_split.n_items)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ranks = evaluate(model, small_split, "test", torch.device("cpu"))
    target = np.array([b.target[i].item() for b in small_split.eval_batches("test", 10**6) for i in range(b.size)])
    users = np.concatenate([b.users.numpy() for b in small_split.eval_batches("test", 10**6)])
    exact = np.empty_like(ranks)
    exact[users] = small_split.n_items - target  # items above target t: t+1..n_items
    assert np.array_equal(ranks, exact)
    rounded = torch.tensor(1 + 1e-4 * np.arange(small_split.n_items + 1.0)).bfloat16()
    assert len(torch.unique(rounded)) < small_split.n_items / 4  # bf16 would have tied them


def test_evaluate_ranks_are_the_same_under_fp32_and_bf16(small_split):
    """For fixed weights the ranks do not depend on the precision training runs in."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(hidden=16, inner=32, max_len=20), small_split.n_items)
    plain = evaluate(model, small_split, "valid", torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = evaluate(model, small_split, "valid", torch.device("cpu"))
    assert np.array_equal(plain, inside)


@pytest.mark.skipif(not train_mod.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_runs_on_cpu_and_its_ranks_are_fp32_ranks(small_split):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(hidden=16, inner=32, max_len=20), small_split.n_items)
    res = fit(model, small_split, TrainConfig(epochs=2, device="cpu", batch_size=32, precision="bf16"),
              progress=False)
    assert all(np.isfinite(r["loss"]) for r in res.curves)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert np.array_equal(res.test_ranks, evaluate(model, small_split, "test", torch.device("cpu")))


# ---------------------------------------------------------------------------------- the flag
def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if train_mod.AUTO_BF16 else "fp32")
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(HarnessError, match="no native bf16"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(HarnessError, match="expected one of"):
        resolve_precision("fp16", "cpu")


def test_bf16_on_a_cpu_without_it_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    result = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path), "train", "--model", "sasrec", "--dataset",
                                      "synthetic", "--device", "cpu", "--precision", "bf16", "--epochs", "1"])
    assert result.exit_code == 1
    assert "no native bf16" in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture(params=["native", "eager"])
def erl_path(request, monkeypatch):
    """ReaRec-ERL's objective through the fused C kernel (harness/native.py) and through the eager
    formula it replaces: both must give the reference's values and gradients."""
    import models.losses as losses_mod
    from harness import native

    if request.param == "eager":
        monkeypatch.setattr(losses_mod, "_erl_kernel", None)
    elif _has_compiler():
        assert native.erl_kernel() is not None  # a compiler is here: the kernel must build
        monkeypatch.setattr(losses_mod, "_erl_kernel", native.erl_rows)
    else:
        pytest.skip("not Linux with a C compiler: the fused kernel is not required to build here")
    return request.param


def _has_compiler() -> bool:
    """Where the fused kernel must build: Linux with a C compiler (elsewhere, e.g. a compiler
    without OpenMP, the harness falls back to the eager path, and these tests are skipped)."""
    import shutil
    import sys

    return sys.platform.startswith("linux") and any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.mark.parametrize("steps", [2, 3])
def test_ensemble_objective_is_rearec_erl_loss(steps, erl_path):
    from models.losses import ensemble_objective
    from models.rearec import pairwise_kl

    g = torch.Generator().manual_seed(1)
    o = (torch.randn(9, steps, 8, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(70, 8, generator=g) * 0.5).requires_grad_()
    t = torch.randint(1, 70, (9,), generator=g)
    tau, kw = 0.3, 0.05
    logits = o @ w.T / tau
    ref_ce = F.cross_entropy(logits.mean(1), t)
    ref_kl = pairwise_kl(logits)
    ref = ref_ce - kw * ref_kl
    ref_grads = torch.autograd.grad(ref, [o, w])
    loss, ce, kl = ensemble_objective(o, w, t, tau, kw)
    grads = torch.autograd.grad(loss, [o, w])
    assert float(ce) == pytest.approx(float(ref_ce.detach()), rel=1e-6)
    assert float(kl) == pytest.approx(float(ref_kl.detach()), rel=1e-5, abs=1e-6)
    assert not ce.requires_grad and not kl.requires_grad
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ensemble_objective_over_several_row_blocks(monkeypatch, precision, erl_path):
    """Rows split into blocks (a block's logits over a few KiB) and sub-blocks (11 rows: blocks of
    4, 4, 3; sub-blocks of 2, 2, 2, 2, 2, 1), in both precisions: the loss,
    CE and KL of the step logits the matmul dtype gives, and their gradients (bf16: the logit
    gradient is rounded to bf16 for its matmuls, as autocast's own backward would)."""
    import models.losses as losses_mod
    from models.rearec import pairwise_kl

    monkeypatch.setattr(losses_mod, "_BLOCK_BYTES", 4 * 3 * 300 * 4)  # 4 rows of 3 steps x 300 items
    monkeypatch.setattr(losses_mod, "_SUB_BYTES", 2 * 3 * 300 * 4)  # their elementwise passes 2 rows at a time
    monkeypatch.setattr(losses_mod, "_NATIVE_BLOCK_BYTES", 4 * 3 * 300 * 4)  # the kernel's blocks: 4 rows
    g = torch.Generator().manual_seed(2)
    o = (torch.randn(11, 3, 16, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_()
    t = torch.randint(1, 300, (11,), generator=g)
    tau, kw = 0.2, 0.01
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    logits = ((o / tau).to(dtype) @ w.to(dtype).T).float()
    ref_ce = F.cross_entropy(logits.mean(1), t)
    ref_kl = pairwise_kl(logits)
    ref_grads = torch.autograd.grad(ref_ce - kw * ref_kl, [o, w])
    ref_ce, ref_kl = ref_ce.detach(), ref_kl.detach()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        loss, ce, kl = losses_mod.ensemble_objective(o, w, t, tau, kw)
    grads = torch.autograd.grad(loss, [o, w])
    assert float(ce) == pytest.approx(float(ref_ce), rel=1e-5)
    assert float(kl) == pytest.approx(float(ref_kl), rel=1e-4, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ref_ce - kw * ref_kl), rel=1e-5)
    tol = dict(rtol=1e-5, atol=1e-7) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3 * float(ref_grads[0].abs().max()))
    torch.testing.assert_close(grads[0], ref_grads[0], **tol)
    if precision == "bf16":
        tol["atol"] = 2e-3 * float(ref_grads[1].abs().max())
    torch.testing.assert_close(grads[1], ref_grads[1], **tol)


def test_ensemble_objective_has_no_underflow_where_the_target_is_far_behind(erl_path):
    """The ensemble's target probability underflows fp32 (its logit ~hundreds below the best):
    the CE still equals the float64 cross-entropy of the mean logits."""
    from models.losses import ensemble_objective

    g = torch.Generator().manual_seed(3)
    o = torch.randn(6, 2, 8, generator=g) * 6.0
    w = torch.randn(50, 8, generator=g) * 6.0
    t = torch.randint(1, 50, (6,), generator=g)
    tau = 0.1
    mean_logits = (o.double() @ w.double().T / tau).mean(1)
    ref = F.cross_entropy(mean_logits, t)
    _, ce, _ = ensemble_objective(o, w, t, tau, 0.0)
    assert float(ref) > 200 and torch.isfinite(ce)
    assert float(ce) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_erl_kernel_is_the_float64_formula(dtype):
    """The C kernel alone against float64 torch: the ensemble's NLL, E_pj[z_j - mean z], and each
    step's logit gradient c p_j (w_j - E_pj[w_j]) + inv (softmax(mean) - one-hot), on logits
    spread over a hundred (probabilities down to 1e-40: clamped, not denormal), over several
    threads; without a gradient buffer only the NLL and E_pj[w_j]."""
    from harness import native

    if not _has_compiler():
        pytest.skip("not Linux with a C compiler: the fused kernel is not required to build here")
    assert native.erl_kernel() is not None
    g = torch.Generator().manual_seed(0)
    R, T, N = 7, 3, 1001
    z = (torch.randn(R, T, N, generator=g) * 20).to(dtype)
    t = torch.randint(0, N, (R,), generator=g)
    c, inv = -0.3, 0.7
    nll, ew, grad = torch.empty(R), torch.empty(R, T), torch.empty(R, T, N, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # rows split over three threads, unevenly
    try:
        native.erl_rows(z, t, nll, ew, grad, c, inv)
    finally:
        torch.set_num_threads(threads)
    zd = z.double()
    zm = zd.mean(1)
    rows = torch.arange(R)
    ref_ce = torch.softmax(zm, 1)
    ref_ce[rows, t] -= 1
    p = torch.softmax(zd, 2)
    w = zd - zm[:, None]
    ref_ew = (p * w).sum(2)
    ref_grad = c * p * (w - ref_ew[..., None]) + inv * ref_ce[:, None]
    ref_nll = torch.logsumexp(zm, 1) - zm[rows, t]
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ew.double(), ref_ew, rtol=1e-6, atol=5e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    nll2, ew2 = torch.empty(R), torch.empty(R, T)
    native.erl_rows(z, t, nll2, ew2)  # no gradient wanted
    assert torch.equal(nll2, nll) and torch.equal(ew2, ew)
    with pytest.raises(IndexError):
        native.erl_rows(z, torch.full((R,), N), nll, ew, grad, c, inv)


def test_without_a_compiler_erl_runs_eagerly_with_one_warning(monkeypatch, tmp_path):
    """No C compiler (or HARNESS_NATIVE=0): `install` warns once and leaves ERL's objective on its
    eager path; a run that needs the kernel still builds its model."""
    import models.losses as losses_mod
    from harness import native

    monkeypatch.setattr(losses_mod, "_erl_kernel", losses_mod._erl_kernel)  # restored afterwards
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable"):
        assert native.install() is False
    assert losses_mod._erl_kernel is None
    assert native.install() is False  # no second attempt, no second warning
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("HARNESS_NATIVE", "0")
    monkeypatch.delenv("CC")
    assert native.erl_kernel() is None


def test_a_rearec_erl_run_installs_the_kernel(monkeypatch, tmp_path):
    import models.losses as losses_mod
    from harness.runs import RunSpec, build_model, load_data

    if not _has_compiler():
        pytest.skip("not Linux with a C compiler: the fused kernel is not required to build here")
    monkeypatch.setattr(losses_mod, "_erl_kernel", None)
    spec = RunSpec("rearec-erl", dataset="synthetic", train=TrainConfig(device="cpu", epochs=1), cache_dir=tmp_path)
    build_model(spec, load_data(spec), progress=False)
    assert losses_mod._erl_kernel is not None
    monkeypatch.setattr(losses_mod, "_erl_kernel", None)
    build_model(RunSpec("rearec-erl", dataset="synthetic", params={"kl_weight": 0.0}, cache_dir=tmp_path,
                        train=TrainConfig(device="cpu", epochs=1)), load_data(spec), progress=False)
    assert losses_mod._erl_kernel is None  # the plain CE: no kernel needed
