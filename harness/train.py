"""The one shared trainer: `fit` trains any registered model, `evaluate` ranks all items.

Adam, early stopping on validation NDCG@10 with patience, the best epoch's weights restored,
then validation and test evaluated once on them. A per-epoch callback receives the epoch's
validation metrics (Optuna pruning plugs in here; it may raise to stop the run). The model
brings its own objective through `loss(batch)`, so contrastive terms, cloze masking or
per-epoch k-means (via `on_epoch_start`) all use this same loop.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness import faults, stopping
from harness.data.split import LeaveOneOut
from harness.errors import HarnessError
from harness.metrics import metrics_from_ranks, target_ranks
from harness.progress import resolve

SELECT_METRIC = "ndcg@10"


@dataclass
class TrainConfig:
    epochs: int = 200
    patience: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    eval_batch_size: int = 1024
    seed: int = 2020
    device: str = "auto"
    mask_history: bool = False
    max_len: int = 50
    # "fp32", "bf16" (autocast; fp32 master weights and optimizer) or "auto" (see
    # resolve_precision). Part of a run's identity: the CLI stores the resolved name.
    precision: str = "auto"


PRECISIONS = ("auto", "fp32", "bf16")
# What "auto" picks where the hardware has native bf16: bf16, because a converged bf16 SASRec
# on Amazon Toys (same seed, early-stopped) came within 3% of fp32's test NDCG@10.
AUTO_BF16 = True


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    curves: list[dict] = field(default_factory=list)
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    valid_ranks: np.ndarray | None = None
    test_ranks: np.ndarray | None = None
    stopped: str = ""  # why training ended: "early stop", "max epochs"
    # the same checkpoint's test metrics under the other ranking protocol, for reference only
    # (model selection used the configured one): {"mask_history": bool, "test": {...}}
    other_protocol: dict = field(default_factory=dict)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("valid_ranks"), d.pop("test_ranks")
        return d


class TrainingDiverged(HarnessError):
    pass


EpochCallback = Callable[[int, dict], None]


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed large blocks instead of unmapping them (once per process).

    Why: a CPU step allocates tens of MB-sized temporaries (logits, activations, masks). glibc
    serves each allocation above its mmap threshold with fresh pages from the kernel and unmaps
    them on free, so every such tensor pays its page faults again: on this VM large elementwise
    ops (softmax, mul) ran 2-3x slower than into reused memory. The price is that the process
    keeps its peak heap (its RSS does not shrink after a large step). No-op off glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HarnessError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); without it torch
    emulates bf16 matmuls, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(name: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for `--precision NAME` on `device`; a clear error for bf16 where the
    hardware has none. "auto" is bf16 where it is native and AUTO_BF16 holds, else fp32."""
    if name not in PRECISIONS:
        raise HarnessError(f"--precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return name
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    has = bf16_available(device)
    if name == "bf16" and not has:
        where = "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16 / AMX)"
        raise HarnessError(f"--precision bf16: {where} has no native bf16; use --precision fp32")
    if name == "auto":
        return "bf16" if has and AUTO_BF16 else "fp32"
    return name


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam, fused (one kernel over all parameters instead of a dozen ops per tensor: the same
    update, 5x less time on the optimizer step on a CPU). The parameters as one group, which may
    be empty (torch refuses an empty list, not an empty group): a model with nothing to train
    (MostPop) gets an optimizer whose steps do nothing, so `fit` and `harness bench` need no
    special case for it."""
    return torch.optim.Adam([{"params": list(params)}], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16 autocast (no loss scaling needed: bf16 has fp32's range) for precision "bf16",
    else nothing. Parameters and the optimizer stay fp32 either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: LeaveOneOut, split: str, device: torch.device,
             mask_history: bool = False, batch_size: int = 1024) -> np.ndarray:
    """Per-user 0-based pessimistic ranks of the split's target over all items (user order).

    Always fp32, whatever the training precision: the ranks are a function of the weights
    alone, so bf16 and fp32 runs (and CPU and GPU) are ranked by the same rule. Rounding scores
    to bf16 makes near-equal scores tie, and ties count against the target. The forward pass is
    a small share of an evaluation (the scoring matmul and the ranking dominate)."""
    was_training = model.training
    model.eval()
    ranks = np.empty(data.n_users, dtype=np.int64)
    for batch in data.eval_batches(split, batch_size):
        users = batch.users.numpy()
        batch = batch.to(device)
        with torch.autocast(device.type, enabled=False):  # fp32 even inside a caller's autocast
            scores = model.scores(batch)
        exclude = None
        if mask_history:
            rows, items = data.history_index(users, split)
            exclude = (torch.from_numpy(rows).to(device), torch.from_numpy(items).to(device))
        ranks[users] = target_ranks(scores, batch.target, exclude).cpu().numpy()
    model.train(was_training)
    return ranks


def fit(model: torch.nn.Module, data: LeaveOneOut, cfg: TrainConfig,
        on_epoch: EpochCallback | None = None, progress=True,
        checkpoint: Path | None = None) -> FitResult:
    """Train `model` on `data` and return metrics of its best validation epoch.

    `progress` (harness.progress: a Progress, or True/False for one chosen here or none) shows
    the epochs (a bar with the batches on a terminal, a line per epoch elsewhere) under its label.

    With `checkpoint`, the full training state is saved there after every epoch and a run
    that finds one resumes from it (same weights, optimizer, RNG streams and curves, so the
    resumed run is the run that was interrupted); the file is removed when training ends.
    Only such a run stops when `harness.stopping` says a stop is due (a deadline, a signal):
    after the epoch in flight and its checkpoint, by raising RunStopped."""
    reporter = resolve(progress)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    keep_freed_memory()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    # nothing to train (MostPop, whose on_epoch_start counts the training items): one epoch, as
    # every later one would score exactly as the first
    epochs = cfg.epochs if params else min(cfg.epochs, 1)
    rng = np.random.default_rng(cfg.seed)
    layout = getattr(model, "layout", "sequence")

    best_value, best_epoch, best_state = -1.0, 0, None
    curves: list[dict] = []
    stopped = "max epochs" if params else "one epoch (no trainable parameters)"
    start = 1
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        best_value, best_epoch, best_state, curves = (state["best_value"], state["best_epoch"],
                                                      state["best_state"], state["curves"])
        start = len(curves) + 1
        reporter.line(f"resuming from {checkpoint} after epoch {len(curves)}")
    task = reporter.start(epochs, done=start - 1)
    try:
        for epoch in range(start, epochs + 1):
            if epoch - best_epoch > cfg.patience:  # a resumed run that had already stopped
                break
            model.train()
            t0 = time.perf_counter()  # a model's per-epoch preparation (k-means) is training time
            with autocast(device, precision):  # a model's per-epoch encoding (k-means input) too
                model.on_epoch_start(epoch, data)
            batches = data.train_batches(layout, cfg.batch_size, rng)
            loss_sum, parts_sum, n_seen = 0.0, {}, 0
            task.steps(len(batches))
            for step, batch in enumerate(batches):
                batch = batch.to(device)
                with autocast(device, precision):
                    out = model.loss(batch)
                loss = out["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                if not np.isfinite(value):
                    raise TrainingDiverged(
                        f"training diverged: loss is {value} at epoch {epoch}, batch {step + 1}; "
                        f"try a lower --lr (now {cfg.lr:g})")
                loss_sum += value
                n_seen += 1
                for key, v in out.items():
                    if key != "loss":
                        parts_sum[key] = parts_sum.get(key, 0.0) + float(v)
                task.step(loss_sum / n_seen)
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            val_ranks = evaluate(model, data, "valid", device, cfg.mask_history, cfg.eval_batch_size)
            val = metrics_from_ranks(val_ranks)
            row = {"epoch": epoch, "loss": loss_sum / max(n_seen, 1),
                   **{k: v / max(n_seen, 1) for k, v in parts_sum.items()},
                   **{f"valid_{k}": v for k, v in val.items()},
                   "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1}
            curves.append(row)
            improved = val[SELECT_METRIC] > best_value
            if improved:
                best_value, best_epoch = val[SELECT_METRIC], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            early = epoch - best_epoch >= cfg.patience
            task.update(epoch, f"valid {SELECT_METRIC} {val[SELECT_METRIC]:.4f} (best {best_value:.4f})",
                        detail=f"loss {row['loss']:.4f}, {train_s:.1f} s train + {row['eval_seconds']:.1f} s eval",
                        last=early or epoch == epochs, note="early-stopped" if early else "")
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, optimizer, rng, best_value, best_epoch, best_state, curves)
                faults.point("checkpoint")
            if on_epoch is not None:
                on_epoch(epoch, row)
            if early:
                stopped = f"early stop (no gain in validation {SELECT_METRIC} for {cfg.patience} epochs)"
                break
            why = stopping.stop_due() if checkpoint is not None and epoch < epochs else None
            if why:
                raise stopping.RunStopped(f"stopped after epoch {epoch} ({why}); checkpoint {checkpoint}")
    finally:
        task.finish()
    if best_state is not None:
        model.load_state_dict(best_state)
    if curves and len(curves) - best_epoch >= cfg.patience:
        stopped = f"early stop (no gain in validation {SELECT_METRIC} for {cfg.patience} epochs)"
    valid_ranks = evaluate(model, data, "valid", device, cfg.mask_history, cfg.eval_batch_size)
    test_ranks = evaluate(model, data, "test", device, cfg.mask_history, cfg.eval_batch_size)
    other = evaluate(model, data, "test", device, not cfg.mask_history, cfg.eval_batch_size)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return FitResult(best_epoch=best_epoch, epochs_run=len(curves), curves=curves,
                     valid=metrics_from_ranks(valid_ranks), test=metrics_from_ranks(test_ranks),
                     valid_ranks=valid_ranks, test_ranks=test_ranks, stopped=stopped,
                     other_protocol={"mask_history": not cfg.mask_history, "test": metrics_from_ranks(other)})


def _save_checkpoint(path: Path, model, optimizer, rng, best_value, best_epoch, best_state, curves) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "best_value": best_value, "best_epoch": best_epoch, "best_state": best_state,
                "curves": curves}, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous epoch's checkpoint
