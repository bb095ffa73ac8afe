"""`harness bench`: time training batches and a full evaluation, count the FLOPs,
and report achieved FLOP/s against this machine's measured matmul throughput (MFU).

FLOPs are counted, not estimated, with torch's FlopCounterMode (every matmul and attention of
forward + backward) on the same batches that were timed, then split in two: the
output layer (scores against every item) and the encoder (everything else; per-module attribution is left out on purpose: torch
attributes the backward of ops outside submodules, like the output layer, to the wrong
module). Time is split by
phase (building batches, forward, backward, optimizer step) so a slow part is visible at once.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.errors import HarnessError
from harness.runs import RunSpec, build_model, load_data
from harness.train import (autocast, evaluate, keep_freed_memory, make_optimizer, resolve_device, resolve_precision,
                           seed_everything)


@dataclass
class BenchReport:
    model: str
    dataset: str
    device: str
    threads: int
    n_batches: int
    samples: int
    epoch_samples: int
    epoch_batches: int
    positions: int  # encoder positions computed in the timed batches (padding included)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)  # timed batches, forward + backward
    eval_seconds: float = 0.0
    epoch_start_seconds: float = 0.0  # the model's once-per-epoch preparation (ICLRec/ICSRec k-means)
    eval_flops: float = 0.0
    peak_flops: float = 0.0  # measured matmul FLOP/s of this precision
    top_ops: list[tuple[str, float]] = field(default_factory=list)  # (op, share of self CPU/CUDA time)
    precision: str = "fp32"
    clock: str = "wall"  # what the seconds are: wall time or this process's CPU time
    peak_memory: float = 0.0  # bytes: process peak RSS (CPU, measured in a fresh process) or CUDA peak

    @property
    def train_seconds(self) -> float:
        return sum(self.phase_seconds.values())

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / self.samples * self.epoch_samples + self.epoch_start_seconds

    @property
    def achieved(self) -> float:
        return self.flops.get("total", 0.0) / max(self.train_seconds - self.phase_seconds.get("batches", 0), 1e-9)


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = ["wall"]


def _now() -> float:
    """The bench's clock: wall time, or with --clock cpu this process's CPU time, which time
    slicing by other processes does not inflate (1 thread: it is the wall time of an idle
    machine; with more threads it sums them)."""
    return _CLOCKS[_clock[0]]()


def matmul_peak(device: torch.device, precision: str = "fp32", n: int = 2048, repeat: int = 10) -> float:
    """Measured dense (n x n) @ (n x n) matmul FLOP/s in the given precision: MFU's denominator."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = _now()
    for _ in range(repeat):
        a @ b
    _sync(device)
    return 2 * n**3 * repeat / (_now() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(spec: RunSpec, n_batches: int = 200, warmup: int = 5, clock: str = "wall") -> BenchReport:
    from torch.utils.flop_counter import FlopCounterMode

    if clock not in _CLOCKS:
        raise HarnessError(f"--clock {clock!r}: expected wall or cpu")
    _clock[0] = clock
    device = resolve_device(spec.train.device)
    precision = resolve_precision(spec.train.precision, device)
    keep_freed_memory()  # as fit() does
    data = load_data(spec)
    model, _, _ = build_model(spec, data, progress=True)
    model.to(device).train()
    seed_everything(spec.train.seed)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], spec.train, device)
    layout = getattr(model, "layout", "sequence")
    rng = np.random.default_rng(spec.train.seed)

    t = _now()
    with autocast(device, precision):
        model.on_epoch_start(1, data)
    _sync(device)
    epoch_start = _now() - t

    t = _now()
    epoch = data.train_batches(layout, spec.train.batch_size, rng)
    batch_build = _now() - t  # one epoch's batches, scaled to the timed share below
    warmup = min(warmup, len(epoch) - 1)  # a tiny dataset: fewer warm-up batches, at least one timed
    n_batches = min(n_batches, len(epoch) - warmup)
    timed = epoch[warmup : warmup + n_batches]

    def step(batch):
        with autocast(device, precision):
            loss = model.loss(batch)["loss"]
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up, then the timed batches once untimed: CPU bf16 compiles a kernel per new matmul shape
    # (harness/__init__.py), which a real run pays in its first epoch only; timing from the
    # second pass is the steady per-epoch cost
    for batch in epoch[:warmup] + timed:
        loss = step(batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    phases = {"batches": batch_build * n_batches / len(epoch), "to_device": 0.0, "forward": 0.0,
              "backward": 0.0, "optimizer": 0.0}
    for batch in timed:
        t0 = _now()
        batch = batch.to(device)
        _sync(device)
        t1 = _now()
        loss = step(batch)
        _sync(device)
        t2 = _now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t3 = _now()
        optimizer.step()
        _sync(device)
        t4 = _now()
        phases["to_device"] += t1 - t0
        phases["forward"] += t2 - t1
        phases["backward"] += t3 - t2
        phases["optimizer"] += t4 - t3

    # count the FLOPs of exactly the timed batches (not timed: the counter adds overhead)
    counter = FlopCounterMode(display=False)
    with counter:
        for batch in timed:
            step(batch.to(device)).backward()
    optimizer.zero_grad(set_to_none=True)
    total = float(counter.get_total_flops())
    samples = int(sum(int(b.targets.gt(0).sum()) if layout == "sequence" else b.size for b in timed))
    d = _output_width(model)
    n_views = model.output_views
    output = 6.0 * samples * n_views * d * (data.n_items + 1)
    flops = {"total": total, "output_layer": output, "encoder": max(total - output, 0.0)}

    top_ops = profile_ops(model, optimizer, timed[:20], device, step)

    _sync(device)
    t = _now()
    evaluate(model, data, "valid", device, spec.train.mask_history, spec.train.eval_batch_size)
    _sync(device)
    eval_seconds = _now() - t
    return BenchReport(
        model=spec.model, dataset=spec.dataset, device=str(device), threads=torch.get_num_threads(),
        n_batches=n_batches, samples=samples, epoch_samples=data.n_train_samples(), epoch_batches=len(epoch),
        positions=int(sum(b.items.numel() for b in timed)), phase_seconds=phases, flops=flops,
        eval_seconds=eval_seconds, epoch_start_seconds=epoch_start, eval_flops=2.0 * data.n_users * d * (data.n_items + 1),
        peak_flops=matmul_peak(device, precision), top_ops=top_ops, precision=precision, clock=clock,
        peak_memory=_peak_memory(device))


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def profile_ops(model, optimizer, batches, device: torch.device, step) -> list[tuple[str, float]]:
    """The operators that take the time (torch.profiler, self time), for 'where does it go'."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr(), profile(activities=activities) as prof:
        for batch in batches:
            loss = step(batch.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: -getattr(e, attr))
    return [(e.key, getattr(e, attr) / total) for e in events[:10]]


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines straight to fd 2: keep the report clean."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _output_width(model) -> int:
    return int(model.item_emb.weight.shape[1]) if hasattr(model, "item_emb") else 0


def format_report(r: BenchReport):
    from rich.table import Table

    scale = r.epoch_samples / max(r.samples, 1)
    table = Table(title=f"bench: {r.model} on {r.dataset} ({r.device}, {r.threads} threads, {r.precision}, "
                        f"{r.clock} seconds)",
                  show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows = [
        ("timed batches / epoch batches", f"{r.n_batches} / {r.epoch_batches}"),
        ("samples/s (training)", f"{r.samples / r.train_seconds:,.0f}"),
        ("seconds per epoch (extrapolated)", f"{r.seconds_per_epoch:.1f}"),
        ("  of which per-epoch preparation (k-means etc.)", f"{r.epoch_start_seconds:.1f}"),
        ("encoder positions per sample (padding incl.)", f"{r.positions / max(r.samples, 1):.2f}"),
        ("full evaluation, one split (s)", f"{r.eval_seconds:.2f}"),
        ("FLOPs per epoch: output layer (6·samples·d·items·views)", f"{r.flops['output_layer'] * scale / 1e12:.3f} T"),
        ("FLOPs per epoch: encoder and the rest (counted)", f"{r.flops['encoder'] * scale / 1e12:.3f} T"),
        ("FLOPs per epoch: total (counted)", f"{r.flops['total'] * scale / 1e12:.3f} T"),
        ("FLOPs per evaluation (2·users·d·items)", f"{r.eval_flops / 1e9:.1f} G"),
        ("achieved FLOP/s (training compute phases)", f"{r.achieved / 1e9:.1f} G"),
        (f"measured matmul peak ({r.precision})", f"{r.peak_flops / 1e9:.1f} G"),
        ("MFU", f"{100 * r.achieved / r.peak_flops:.1f}%"),
        ("evaluation FLOP/s", f"{r.eval_flops / r.eval_seconds / 1e9:.1f} G"),
        ("peak memory", f"{r.peak_memory / 2**30:.2f} GiB"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    total = r.train_seconds
    for phase, s in r.phase_seconds.items():
        table.add_row(f"time: {phase}", f"{s:.2f} s ({100 * s / total:.0f}%)")
    for name, share in r.top_ops:
        table.add_row(f"op time: {name}", f"{100 * share:.0f}%")
    return table


# ------------------------------------------------------------------------- many models
def report_dict(r: BenchReport) -> dict:
    """A report as plain JSON data, with the derived figures scripts want."""
    d = dataclasses.asdict(r)
    d.update(seconds_per_epoch=r.seconds_per_epoch, train_seconds=r.train_seconds, achieved_flops=r.achieved,
             mfu=r.achieved / r.peak_flops if r.peak_flops else 0.0,
             flops_per_epoch=r.flops.get("total", 0.0) * r.epoch_samples / max(r.samples, 1))
    return d


def bench_in_subprocess(spec: RunSpec, n_batches: int, clock: str = "wall") -> dict:
    """One benchmark in a fresh process: its peak memory is this model's alone, and nothing one
    model leaves behind (caches, allocator state, threads) slows the next."""
    import json
    import subprocess

    # a benchmark's throwaway pre-training (one LID epoch) stays in the cache, never in a run folder
    spec = dataclasses.replace(spec, pretrained_dir=None, checkpoint_dir=None)
    blob = json.dumps({"spec": {**dataclasses.asdict(spec), "data_dir": str(spec.data_dir),
                                "cache_dir": str(spec.cache_dir)}, "n_batches": n_batches, "clock": clock})
    proc = subprocess.run([sys.executable, "-c", "import sys; from harness.bench import _child; _child(sys.argv[1])",
                           blob], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"bench {spec.model} ({spec.train.precision}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(blob: str) -> None:
    import json
    from pathlib import Path

    from harness.train import TrainConfig

    args = json.loads(blob)
    raw = args["spec"]
    spec = RunSpec(**{**raw, "train": TrainConfig(**raw["train"]), "data_dir": Path(raw["data_dir"]),
                      "cache_dir": Path(raw["cache_dir"])})
    print(json.dumps(report_dict(benchmark(spec, n_batches=args["n_batches"], clock=args["clock"]))))


def bench_models(base: RunSpec, models: list[str], precisions: list[str], n_batches: int,
                 echo=print, clock: str = "wall") -> list[dict]:
    """`bench` of every model in every precision (each in its own process); rows in order."""
    out = []
    for model in models:
        for precision in precisions:
            spec = dataclasses.replace(base, model=model, train=dataclasses.replace(base.train, precision=precision))
            echo(f"bench {model} ({precision}) ...")
            out.append(bench_in_subprocess(spec, n_batches, clock))
    return out


def format_models_table(rows: list[dict]):
    """One row per model: s/epoch per precision, evaluation, FLOPs, FLOP/s, MFU, peak memory."""
    from rich.table import Table

    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["precision"]] = r
    precisions = [p for p in ("fp32", "bf16") if any(p in v for v in by_model.values())]
    first = rows[0]
    peaks = ", ".join(f"{p} {next(v[p] for v in by_model.values() if p in v)['peak_flops'] / 1e9:.0f} G"
                      for p in precisions)
    table = Table(title=f"bench: {first['dataset']} ({first['device']}, {first['threads']} threads, "
                        f"{first.get('clock', 'wall')} seconds; measured matmul peak {peaks}FLOP/s)")
    table.add_column("model")
    for p in precisions:
        table.add_column(f"s/epoch {p}", justify="right")
    if len(precisions) == 2:
        table.add_column("bf16 speed-up", justify="right")
    table.add_column("eval s", justify="right")
    table.add_column("TFLOP/epoch", justify="right")
    for p in precisions:
        table.add_column(f"GFLOP/s {p}", justify="right")
        table.add_column(f"MFU {p}", justify="right")
    for p in precisions:
        table.add_column(f"peak mem {p}", justify="right")
    for model, per in by_model.items():
        cells = [model]
        cells += [f"{per[p]['seconds_per_epoch']:.1f}" if p in per else "-" for p in precisions]
        if len(precisions) == 2:
            both = all(p in per for p in precisions)
            cells.append(f"{per['fp32']['seconds_per_epoch'] / per['bf16']['seconds_per_epoch']:.2f}x" if both else "-")
        any_row = next(iter(per.values()))
        cells += [f"{any_row['eval_seconds']:.2f}", f"{any_row['flops_per_epoch'] / 1e12:.2f}"]
        for p in precisions:
            cells += ([f"{per[p]['achieved_flops'] / 1e9:.0f}", f"{100 * per[p]['mfu']:.1f}%"] if p in per else ["-", "-"])
        cells += [f"{per[p]['peak_memory'] / 2**30:.2f} GiB" if p in per else "-" for p in precisions]
        table.add_row(*cells)
    return table
