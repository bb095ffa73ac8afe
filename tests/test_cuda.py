"""On a CUDA GPU: the fused cross-entropy is F.cross_entropy in fp32 and under bf16 autocast,
scores are ranked in fp32 (near-ties exact inside bf16 autocast), every registered model trains
an epoch and is ranked in fp32 and bf16, and a CPU and the GPU rank the same weights alike
(ARCHITECTURE.md's fixed protocol). Skipped without CUDA; scripts/gpu-check.sh runs this file on
a GPU. `HARNESS_CUDA_TESTS_ON_CPU=1` runs it on the CPU instead (a check of the tests themselves
where no GPU is; the CPU/GPU comparison is then CPU against CPU)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from harness.train import TrainConfig, cpu_has_native_bf16, evaluate, fit
from models.losses import item_scores, linear_cross_entropy

ON_CPU = os.environ.get("HARNESS_CUDA_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
NO_DEVICE = not ON_CPU and not torch.cuda.is_available()
pytestmark = pytest.mark.skipif(NO_DEVICE, reason="needs CUDA (scripts/gpu-check.sh runs these on a GPU)")
HAS_BF16 = cpu_has_native_bf16() if ON_CPU else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
needs_bf16 = pytest.mark.skipif(not NO_DEVICE and not HAS_BF16, reason="the device has no native bf16")
PRECISIONS = ["fp32", pytest.param("bf16", marks=needs_bf16)]
MAX_LEN = 20


def _case(R=37, N=301, d=16, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, d, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(N, d, generator=g) * 0.5).to(DEVICE).requires_grad_()
    b = (torch.randn(N, generator=g) * 0.1).to(DEVICE).requires_grad_() if bias else None
    t = torch.randint(0, N, (R,), generator=g).to(DEVICE)
    return h, w, b, t


# ----------------------------------------------------------------------- the fused cross-entropy
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_rows", [None, 5])
def test_fused_ce_equals_cross_entropy_in_fp32(bias, block_rows):
    h, w, b, t = _case(bias=bias)
    params = [h, w] + ([b] if bias else [])
    ref = F.cross_entropy(F.linear(h, w, b), t)
    got = linear_cross_entropy(h, w, t, bias=b, block_rows=block_rows)
    assert got.device.type == DEVICE.type and got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    for mine, theirs in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        assert mine.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@needs_bf16
@pytest.mark.parametrize("R, block_rows", [(64, None), (200, 70)])
def test_fused_ce_under_bf16_autocast_matches_autocast_cross_entropy(R, block_rows):
    h, w, b, t = _case(R=R, N=500, d=32)
    params = [h, w, b]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w, b), t)
        got = linear_cross_entropy(h, w, t, bias=b, block_rows=block_rows)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=5e-3)
    for mine, theirs, p in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params), params):
        assert mine.dtype == p.dtype == torch.float32  # fp32 master weights get fp32 gradients
        assert float((mine - theirs).norm() / theirs.norm()) < 2e-2


# ------------------------------------------------------------------------------ fp32 ranking
def test_item_scores_are_fp32_inside_bf16_autocast():
    h, w, b, _ = _case()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=HAS_BF16):
        s = item_scores(h, w, b)
    assert s.dtype == torch.float32 and s.device.type == DEVICE.type
    torch.testing.assert_close(s, h @ w.T + b, rtol=1e-5, atol=1e-5)


class _NearTies(torch.nn.Module):
    """Scores 1 + i * 1e-4 for item i: distinct in fp32, tied in runs of ~40 by bf16."""

    layout = "sequence"

    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.emb = torch.nn.Parameter(torch.zeros(1))

    def scores(self, batch):
        base = torch.ones(batch.size, 1, device=self.emb.device) + self.emb
        return item_scores(base, (1 + 1e-4 * torch.arange(self.n_items + 1.0, device=self.emb.device))[:, None])


@needs_bf16
def test_close_scores_are_ranked_exactly_inside_bf16_autocast(small_split):
    model = _NearTies(small_split.n_items).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ranks = evaluate(model, small_split, "test", DEVICE)
    batch = next(small_split.eval_batches("test", 10**6))
    exact = np.empty_like(ranks)
    exact[batch.users.numpy()] = small_split.n_items - batch.target.numpy()  # items above target t: t+1..n
    assert np.array_equal(ranks, exact)


# ------------------------------------------------------------------------- every model's step
@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from harness.data.sequences import write_sequences
    from harness.data.synthetic import SyntheticSpec, generate

    path = tmp_path_factory.mktemp("cuda-data") / "small.txt"
    write_sequences(path, generate(SyntheticSpec(users=60, items=40, intents=4, mean_length=10, seed=1)))
    return path


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", models.names())
def test_every_model_trains_an_epoch_and_ranks(name, precision, data_file, tmp_path):
    """The whole run as `harness train` makes it (what the model requires pre-trained first, one
    epoch of its own loss, fp32 ranking of the best checkpoint) on the device."""
    from harness.runs import RunSpec, run

    train = TrainConfig(epochs=1, device=str(DEVICE), batch_size=64, max_len=MAX_LEN, precision=precision)
    record = run(RunSpec(model=name, dataset=str(data_file), train=train, cache_dir=tmp_path, lid_epochs=1),
                 progress=False)
    result = record.result
    assert result["epochs_run"] == 1 and all(np.isfinite(c["loss"]) for c in result["curves"]), result["curves"]
    for split in ("valid", "test"):
        assert all(0.0 <= v <= 1.0 for v in result[split].values()), result[split]
    assert record.train_config["precision"] == precision


# ---------------------------------------------------------------- the same ranks on CPU and GPU
@pytest.fixture(scope="module")
def larger_split():
    """2000 users over 3000 items: enough near-equal scores that a GPU ranking in anything but
    fp32 (TF32, bf16) would move some targets."""
    from harness.data.sequences import SequenceData
    from harness.data.split import LeaveOneOut
    from harness.data.synthetic import SyntheticSpec, generate

    seqs = generate(SyntheticSpec(users=2000, items=3000, intents=16, mean_length=8, seed=3))
    lengths = [len(s) for s in seqs]
    d = SequenceData(items=np.concatenate(seqs).astype(np.int64),
                     offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     user_ids=np.arange(1, len(seqs) + 1), n_items=3000)
    return LeaveOneOut(d, max_len=MAX_LEN)


def _build(name: str, n_items: int):
    from models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    spec = models.get(name)
    cfg = spec.make_config(max_len=MAX_LEN)
    deps = {}
    if "lid" in spec.needs(cfg):  # a frozen (untrained) LID encoder: what matters is the same weights
        deps["lid"] = SASRec(SASRecConfig(hidden=cfg.d_l, inner=4 * cfg.d_l, max_len=MAX_LEN), n_items)
    return spec.build(cfg, n_items, **deps)


@pytest.mark.parametrize("name", ["sasrec", "igr-sr"])
def test_cpu_and_gpu_rank_the_same_weights_alike(name, larger_split):
    """Trained one epoch on the device (bf16 where it has it, as `auto` trains), the weights are
    ranked on the device and on the CPU: the rank arrays are equal, user for user."""
    precision = "bf16" if HAS_BF16 else "fp32"
    model = _build(name, larger_split.n_items)
    fit(model, larger_split, TrainConfig(epochs=1, device=str(DEVICE), batch_size=256, max_len=MAX_LEN,
                                         precision=precision), progress=False)
    on_cpu = copy.deepcopy(model).to("cpu")
    for split in ("valid", "test"):
        for mask in (False, True):
            gpu = evaluate(model, larger_split, split, DEVICE, mask_history=mask, batch_size=512)
            cpu = evaluate(on_cpu, larger_split, split, torch.device("cpu"), mask_history=mask, batch_size=512)
            differ = np.flatnonzero(gpu != cpu)
            assert differ.size == 0, (f"{name} {split} mask_history={mask}: {differ.size} of {gpu.size} users ranked "
                                      f"differently, e.g. users {differ[:5].tolist()}: device {gpu[differ[:5]].tolist()} "
                                      f"cpu {cpu[differ[:5]].tolist()}")
            assert gpu.min() >= 0 and gpu.max() < larger_split.n_items
