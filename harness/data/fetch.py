"""Download a dataset's official raw file and turn it into a `user item item ...` sequence file.

Amazon 2014 5-core reviews (Toys, CDs_and_Vinyl, Beauty) are processed the way S3-Rec's
`data/data_process.py` does it, which is where the Toys file used by S3-Rec, ICLRec and ICSRec
comes from: keep every rating, group by reviewer, stable-sort each user's reviews by
`unixReviewTime`, apply the iterative user-5 / item-5 core, then number users in order of first
appearance in the raw file and items in order of first appearance when the output is read top
to bottom. The Amazon 2023 5-core rating_only CSV (Instrument) gets the same sort and numbering
and no further filtering: the official 5-core is the dataset.
"""
from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from harness.data.catalog import DATASETS, DatasetInfo, canonical_name
from harness.data.sequences import write_sequences
from harness.errors import HarnessError

CORE = 5  # S3-Rec's user_core = item_core = 5
TIMEOUT_S = 30  # per socket operation; a stalled mirror should fail, not hang forever

_GZIP_MAGIC = b"\x1f\x8b"


def _open_text(path: Path) -> IO[str]:
    # Sniff the magic bytes rather than trust the suffix: people gunzip files and keep the name.
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    if compressed:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs; I/O and encoding failures become one-line HarnessErrors."""
    if not path.is_file():
        raise HarnessError(f"{path}: no such file")
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except UnicodeDecodeError as e:
        raise HarnessError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        raise HarnessError(f"{path}:{lineno + 1}: cannot read file ({e})") from None


def _parse_review(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    # Some 2014 files are "loose JSON": Python dict literals (single quotes), which S3-Rec reads
    # with eval(). literal_eval accepts the same text without executing anything.
    try:
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _chronological(events: list[tuple[str, str, int]]) -> dict[str, list[str]]:
    """Group (user, item, time) by user in first-appearance order; stable sort by time."""
    by_user: dict[str, list[tuple[str, int]]] = {}
    for user, item, t in events:
        by_user.setdefault(user, []).append((item, t))
    # list.sort is stable, so same-timestamp reviews (day resolution in 2014) keep file order.
    return {u: [item for item, _ in sorted(its, key=lambda x: x[1])] for u, its in by_user.items()}


def _core_filter(user_items: dict[str, list[str]], core: int = CORE) -> dict[str, list[str]]:
    """Iteratively drop users and items with fewer than `core` interactions until none is left.

    This reaches the same fixed point as S3-Rec's filter_Kcore (the unique maximal k-core). One
    deliberate difference: a user left with no items is dropped, where S3-Rec would keep an empty
    line. On official 5-core files the filter removes nothing.
    """
    while True:
        item_count = Counter(i for items in user_items.values() for i in items)
        kept = {u: [i for i in items if item_count[i] >= core] for u, items in user_items.items()}
        kept = {u: items for u, items in kept.items() if len(items) >= core}
        if kept == user_items:
            return kept
        user_items = kept


def _number(user_items: dict[str, list[str]]) -> list[list[int]]:
    """Item ids 1.. in order of first appearance reading the users top to bottom (0 is padding)."""
    item_id: dict[str, int] = {}
    return [[item_id.setdefault(i, len(item_id) + 1) for i in items] for items in user_items.values()]


def amazon2014_to_sequences(path: Path) -> list[list[int]]:
    """Per-user item-id sequences from an Amazon 2014 `reviews_X_5.json[.gz]` file (S3-Rec's recipe)."""
    path = Path(path)
    events: list[tuple[str, str, int]] = []
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        review = _parse_review(line)
        if not isinstance(review, dict):
            raise HarnessError(f"{path}:{lineno}: not a JSON object (expected one review per line)")
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if key not in review:
                raise HarnessError(f"{path}:{lineno}: missing key {key!r}")
        try:
            t = int(review["unixReviewTime"])
        except (TypeError, ValueError):
            raise HarnessError(
                f"{path}:{lineno}: unixReviewTime {review['unixReviewTime']!r} is not an integer") from None
        events.append((str(review["reviewerID"]), str(review["asin"]), t))
    if not events:
        raise HarnessError(f"{path}: no reviews in file")
    user_items = _core_filter(_chronological(events))
    if not user_items:
        raise HarnessError(f"{path}: nothing left after the user-{CORE}/item-{CORE} core filter")
    return _number(user_items)


def amazon2023_to_sequences(path: Path) -> list[list[int]]:
    """Per-user item-id sequences from an Amazon 2023 5-core `rating_only` CSV (`.csv[.gz]`)."""
    path = Path(path)
    lines = _read_lines(path)
    reader = csv.reader(line for _, line in lines)
    events: list[tuple[str, str, int]] = []
    try:
        header = next(reader)
    except StopIteration:
        raise HarnessError(f"{path}: file is empty; expected a user_id,parent_asin,rating,timestamp CSV") from None
    columns = [c.strip() for c in header]
    missing = [c for c in ("user_id", "parent_asin", "timestamp") if c not in columns]
    if missing:
        raise HarnessError(f"{path}:1: header {','.join(columns)!r} lacks column(s) {', '.join(missing)}; "
                           "expected user_id,parent_asin,rating,timestamp")
    iu, ii, it = columns.index("user_id"), columns.index("parent_asin"), columns.index("timestamp")
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(columns):
            raise HarnessError(f"{path}:{lineno}: {len(row)} fields, header has {len(columns)}")
        try:
            t = int(row[it])
        except ValueError:
            raise HarnessError(f"{path}:{lineno}: timestamp {row[it]!r} is not an integer") from None
        if not row[iu] or not row[ii]:
            raise HarnessError(f"{path}:{lineno}: empty user_id or parent_asin")
        events.append((row[iu], row[ii], t))
    if not events:
        raise HarnessError(f"{path}: no rating rows in file")
    return _number(_chronological(events))


def download(url: str, dest: Path) -> Path:
    """Fetch `url` to `dest` with a byte progress bar on stderr; `dest` appears only when complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write next to dest so the final rename is atomic: an interrupted download never leaves a
    # truncated file that a later run would mistake for the real one.
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out, progress:
            length = response.headers.get("Content-Length")
            task = progress.add_task(f"downloading {dest.name}",
                                     total=int(length) if length and length.isdigit() else None)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                progress.advance(task, len(chunk))
        tmp.replace(dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = getattr(e, "reason", None) or e
        raise HarnessError(
            f"could not download {url}: {reason}. Download it by hand and pass it with --raw FILE") from None
    except BaseException:  # Ctrl-C: don't leave a half-written .part behind
        tmp.unlink(missing_ok=True)
        raise
    return dest


_CONVERTERS = {
    "amazon2014-json": amazon2014_to_sequences,
    "amazon2023-csv": amazon2023_to_sequences,
}


def _mismatches(info: DatasetInfo, stats: dict) -> list[str]:
    expected = {"users": info.users, "items": info.items, "interactions": info.interactions}
    return [f"{k} {stats[k]:,} != {v:,}" + (" (distinct ids; the paper counts one more, the padding id)"
                                             if k == "items" else "")
            for k, v in expected.items() if stats[k] != v]


def fetch(name: str, data_dir: Path, raw: Path | None = None, url: str | None = None,
          force: bool = False) -> tuple[Path, dict]:
    """Build `data_dir/<info.path>` for a registered dataset from its raw file (downloaded unless given).

    Returns the written path and {users, items, interactions, mismatches, raw}; `mismatches` lists
    the differences from the paper's Table 1 figures in the registry (empty when all match).
    """
    info = DATASETS.get(canonical_name(name))
    if info is None:
        raise HarnessError(f"unknown dataset {name!r}: fetch knows {', '.join(sorted(DATASETS))}")
    data_dir = Path(data_dir)
    out = data_dir / info.path
    # Check before downloading: refusing after a 100 MB download would waste the user's time.
    if out.exists() and not force:
        raise HarnessError(f"{out} already exists; pass --force to overwrite it")
    convert = _CONVERTERS.get(info.raw_format)
    if convert is None:
        raise HarnessError(f"dataset {info.name!r} has unsupported raw format {info.raw_format!r}")
    if raw is None:
        source = url or info.raw_url
        raw = data_dir / info.name / "raw" / Path(urllib.parse.urlsplit(source).path).name
        # download() only ever renames a complete file into place, so an existing one is whole.
        if not raw.is_file():
            download(source, raw)
    raw = Path(raw)
    sequences = convert(raw)
    write_sequences(out, sequences)
    stats: dict = {
        "users": len(sequences),
        "items": len({i for seq in sequences for i in seq}),
        "interactions": sum(len(seq) for seq in sequences),
    }
    stats["mismatches"] = _mismatches(info, stats)
    stats["raw"] = str(raw)
    return out, stats
