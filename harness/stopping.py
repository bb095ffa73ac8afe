"""Stopping cleanly before a deadline, and on a signal, so that the same command continues later.

Long studies run as cluster jobs with a wall-time limit, on preemptible machines, or in slices of
a shared box. Optuna's `timeout` only stops starting trials; Lightning and submitit catch a
signal, checkpoint and requeue. The harness does the latter at the level of whole runs:

- `--stop-after DURATION` sets a deadline (wall clock, so worker processes share it through
  `HARNESS_DEADLINE`). A loop that is about to start a run asks `room_for(estimate)`: no run
  starts that its cost estimate says cannot finish before the deadline, except one longer than
  the whole slice (it could never fit one, so it starts at once and carries its checkpoint).
- SIGTERM and SIGUSR1 (SLURM's `--signal=B:USR1@600`, forwarded by the batch script) and a first
  SIGINT ask for the same stop at once; a second SIGINT aborts as Ctrl-C always did.
- The trainer looks at `stop_due()` between epochs only: a run in flight finishes its epoch,
  saves its per-epoch checkpoint and raises `RunStopped`. Whoever owns the run (a tune trial,
  an experiment cell) keeps it resumable and re-raises; the command prints one line (runs done
  / total, what is left, the ETA, the command that continues) and exits with EXIT_STOPPED.

EXIT_STOPPED is 75, EX_TEMPFAIL of sysexits.h ("temporary failure, retry"), distinct from 0 and
from errors (1, 2), so a batch script can requeue exactly when there is work left.
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Callable

EXIT_STOPPED = 75
DEADLINE_ENV = "HARNESS_DEADLINE"  # absolute deadline (Unix time), inherited by worker processes
SLICE_ENV = "HARNESS_SLICE"  # the slice's length in seconds (what "longer than any slice" means)

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_requested: str | None = None  # why a stop was asked for (a signal's name), None until one is
_sigints = 0


class RunStopped(Exception):
    """A run stopped at an epoch boundary with its checkpoint saved (deadline or signal)."""


class NoRoom(RunStopped):
    """The next run would not finish before the deadline, which has not passed yet: a caller
    with shorter work elsewhere (another model's study) may go on with that."""


def parse_duration(text: str) -> float:
    """Seconds in '2h30m', '90s', '45m', '1d2h', or a bare number of seconds."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{text!r}: expected a duration like 2h30m, 45m or 90s")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def set_deadline(seconds_from_now: float) -> None:
    """Start the slice: this process and the workers it starts stop by then."""
    os.environ[DEADLINE_ENV] = repr(time.time() + seconds_from_now)
    os.environ[SLICE_ENV] = repr(seconds_from_now)


def deadline() -> float | None:
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


def seconds_left() -> float | None:
    end = deadline()
    return None if end is None else end - time.time()


def request_stop(reason: str) -> None:
    global _requested
    _requested = reason


def requested() -> str | None:
    """Why a stop was asked for by a signal (None: not asked)."""
    return _requested


def stop_due() -> str | None:
    """Why work in flight should stop now: a signal, or the deadline passed (else None)."""
    if _requested:
        return _requested
    left = seconds_left()
    if left is not None and left <= 0:
        return "the --stop-after deadline passed"
    return None


def room_for(estimate: float | None) -> bool:
    """May a run estimated to take `estimate` seconds start now? Not after a stop request; not
    when it cannot finish by the deadline, unless it is longer than the whole slice (it could
    never fit one: it starts and carries its checkpoint over). An unknown estimate starts."""
    if stop_due():
        return False
    left = seconds_left()
    if left is None or estimate is None:
        return True
    slice_length = float(os.environ.get(SLICE_ENV) or 0)
    return estimate <= left or estimate > slice_length


def install_signal_handlers(echo: Callable[[str], None] | None = None) -> None:
    """SIGTERM, SIGUSR1 and a first SIGINT ask for a stop; a second SIGINT aborts (KeyboardInterrupt)."""

    def on_signal(signum, frame) -> None:
        global _sigints
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            _sigints += 1
            if _sigints > 1:
                raise KeyboardInterrupt
        request_stop(f"{name} received")
        if echo is not None:
            echo(f"{name}: stopping after the epoch in flight (its checkpoint is saved)"
                 + ("; Ctrl-C again aborts" if signum == signal.SIGINT else ""))

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, on_signal)


def reset() -> None:
    """Forget a stop request and the deadline (tests; a process that runs several commands)."""
    global _requested, _sigints
    _requested, _sigints = None, 0
    os.environ.pop(DEADLINE_ENV, None)
    os.environ.pop(SLICE_ENV, None)
