"""The one place the harness makes a rich Console.

On a terminal rich sizes it to the window. Anywhere else (a pipe, a log file, a batch job's
output, a test's captured output) rich would assume 80 columns and fold titles, epoch lines and
paths mid-word; there the console does not wrap at all: a line is as long as it is (COLUMNS,
when set, still wins)."""
from __future__ import annotations

import os
from typing import Any

WIDE = 10_000  # wide enough that no table is ever folded; nothing here fills the console's width


def console(stderr: bool = False, **kwargs: Any):
    """A rich Console on stdout (or stderr) that never wraps when the stream is not a terminal."""
    from rich.console import Console

    out = Console(stderr=stderr, **kwargs)
    if out.is_terminal or "width" in kwargs or "soft_wrap" in kwargs or os.environ.get("COLUMNS"):
        return out
    return Console(stderr=stderr, soft_wrap=True, width=WIDE, **kwargs)
