"""Reading and writing sequence files: one user per line, `user item item ...`, oldest first.

Item ids are positive integers (0 is reserved for padding). Problems are reported with the
file and line: a token that is not a positive integer, an empty file and a repeated user are
errors; a user with fewer than 3 items cannot give a train, a validation and a test item under
leave-one-out, so such lines are dropped and counted in a warning.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

MIN_ITEMS_PER_USER = 3
_INT = re.compile(r"-?[0-9]+")  # int() would also take "4_5" or " 7": not ids


@dataclass
class SequenceData:
    """All users' chronological item sequences in CSR form (flat items + offsets)."""

    items: np.ndarray  # int64, concatenation of every user's sequence
    offsets: np.ndarray  # int64, len = n_users + 1
    user_ids: np.ndarray  # int64, the ids as written in the file
    n_items: int  # largest item id; ids are 1..n_items
    source: str = ""
    content_hash: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_interactions(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_sequences(path: str | Path) -> SequenceData:
    """Parse and validate a sequence file; raise HarnessError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such file")
    flat: list[int] = []
    offsets = [0]
    user_ids: list[int] = []
    seen_users: dict[int, int] = {}
    short_lines: list[int] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                tokens = line.split()
                if not tokens:
                    continue  # blank lines (e.g. a trailing one) carry nothing
                bad = next((t for t in tokens if not _INT.fullmatch(t)), None)
                if bad is not None:
                    raise HarnessError(f"{path}:{lineno}: token {bad!r} is not an integer id")
                values = [int(t) for t in tokens]
                user, seq = values[0], values[1:]
                if user in seen_users:
                    raise HarnessError(
                        f"{path}:{lineno}: user {user} already has a line ({seen_users[user]}); "
                        "one line per user"
                    )
                seen_users[user] = lineno
                if any(v <= 0 for v in seq):
                    bad = next(v for v in seq if v <= 0)
                    raise HarnessError(f"{path}:{lineno}: item id {bad} must be >= 1 (0 is padding)")
                if len(seq) < MIN_ITEMS_PER_USER:
                    short_lines.append(lineno)
                    continue
                flat.extend(seq)
                offsets.append(len(flat))
                user_ids.append(user)
        except UnicodeDecodeError as e:
            raise HarnessError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    if not user_ids:
        what = "is empty" if not short_lines else f"has no user with >= {MIN_ITEMS_PER_USER} items"
        raise HarnessError(f"{path}: file {what}; expected lines of `user item item ...`")
    warnings = []
    if short_lines:
        first = ", ".join(str(n) for n in short_lines[:5])
        warnings.append(
            f"{path}: dropped {len(short_lines)} user(s) with fewer than {MIN_ITEMS_PER_USER} items "
            f"(leave-one-out needs train, valid and test items); lines {first}"
            + ("..." if len(short_lines) > 5 else "")
        )
    items = np.asarray(flat, dtype=np.int64)
    return SequenceData(
        items=items,
        offsets=np.asarray(offsets, dtype=np.int64),
        user_ids=np.asarray(user_ids, dtype=np.int64),
        n_items=int(items.max()),
        source=str(path),
        content_hash=file_hash(path),
        warnings=warnings,
    )


def write_sequences(path: str | Path, sequences: list[list[int]] | list[np.ndarray]) -> None:
    """Write `user item item ...` lines, users numbered 1.. in the given order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of this process's own: two processes generating the same file (a synthetic
    # set, a noisy copy) at once must not write into one temporary file and publish a torn mix
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        for u, seq in enumerate(sequences, start=1):
            f.write(f"{u} " + " ".join(str(int(i)) for i in seq) + "\n")
    tmp.replace(path)


def stats(data: SequenceData) -> dict:
    """The columns of the paper's Table 1 (items = distinct ids actually used)."""
    n_distinct = int(np.unique(data.items).size)
    density = data.n_interactions / (data.n_users * n_distinct)
    return {
        "users": data.n_users,
        "items": n_distinct,
        "interactions": data.n_interactions,
        "sparsity": 1.0 - density,
        "avg_length": data.n_interactions / data.n_users,
    }
