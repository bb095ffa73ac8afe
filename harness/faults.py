"""Fault injection for the reliability tests: a process dies, or a write fails, at a named
point of its work, chosen by the environment variable HARNESS_FAULT (unset: every point is a
no-op costing one dict lookup).

    HARNESS_FAULT="POINT:N[:ACTION][@WORKER]"

kills this process (ACTION `kill`, the default: SIGKILL, as the kernel's OOM killer or a lost
machine would), sends it SIGTERM (ACTION `term`: a scheduler's or a user's request to stop,
which harness/stopping.py turns into a clean stop) or raises a disk-full OSError (ACTION
`enospc`) the N-th time it reaches POINT,
only in tune worker WORKER when given (HARNESS_WORKER, set by the parent; 0 is the parent).
Points: `trial` (a tune trial has started, before its worker is recorded on it), `epoch` (an
epoch's validation is reported), `checkpoint` (any resumable run, pre-training included, has
saved its epoch's checkpoint), `artifact` (before each artifact upload),
`summary` (midway through writing a study's summary), `cell` (an experiment cell is about to
be told its result), `workers` (the parent has started its worker processes)."""
from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("HARNESS_FAULT")
    if not spec:
        return
    spec, _, worker = spec.partition("@")
    where, n, *action = spec.split(":")
    if where != name or (worker and os.environ.get("HARNESS_WORKER", "0") != worker):
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != int(n):
        return
    what = (action or ["kill"])[0]
    if what == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {name}>")
    os.kill(os.getpid(), signal.SIGTERM if what == "term" else signal.SIGKILL)
