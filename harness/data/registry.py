"""Dataset registry: names -> sequence files under a data directory, or any path to a file.

The data directory is `--data-dir`, else env HARNESS_DATA_DIR, else ./data. Processed
arrays are cached under the cache directory (`--cache-dir`, env HARNESS_CACHE_DIR, else
~/.cache/harness) keyed by the file's content hash, so a changed file is never served stale.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from harness.data.catalog import DATASETS, canonical_name
from harness.data.sequences import SequenceData, file_hash, load_sequences
from harness.errors import HarnessError


SYNTHETIC_PREFIX = "synthetic"


class DatasetMissing(HarnessError):
    """A registered dataset whose file is not in the data directory."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def data_dir(option: str | None = None) -> Path:
    return Path(option or os.environ.get("HARNESS_DATA_DIR") or "data")


def cache_dir(option: str | None = None) -> Path:
    default = Path.home() / ".cache" / "harness"
    return Path(option or os.environ.get("HARNESS_CACHE_DIR") or default)


def is_path(name: str) -> bool:
    return "/" in name or name.endswith(".txt") or Path(name).is_file()


def resolve(name: str, data_dir_: Path, cache_dir_: Path | None = None) -> Path:
    """The sequence file for a dataset name or path; a one-line error when it is missing."""
    if Path(name).is_file():
        return Path(name)
    if name.startswith(SYNTHETIC_PREFIX):
        from harness.data.synthetic import synthetic_file

        return synthetic_file(name, cache_dir_ or cache_dir())
    if canonical_name(name) in DATASETS:
        info = DATASETS[canonical_name(name)]
        path = data_dir_ / info.path
        if path.is_file():
            return path
        raise DatasetMissing(
            f"dataset {info.name!r} not found: looked for {path}. Get it with "
            f"`harness data fetch {info.name} --data-dir {data_dir_}` (downloads {info.description} from "
            f"{info.raw_url}), or point --data-dir / HARNESS_DATA_DIR at a directory holding {info.path}",
            info.name)
    if Path(name).is_dir():
        inside = sorted(str(f) for f in Path(name).glob("*.txt"))[:3]
        hint = f" such as {', '.join(inside)}" if inside else ""
        raise HarnessError(f"dataset {name} is a directory, not a file: give a `user item item ...` file{hint}, "
                           f"or a registered name with --data-dir {name}")
    if is_path(name):
        path = Path(name)
        if not path.is_file():
            raise HarnessError(f"dataset file {path} does not exist")
        return path
    known = ", ".join(sorted(DATASETS) + ["synthetic", "synthetic-toys", "synthetic-instrument", "synthetic-cds"])
    raise HarnessError(f"unknown dataset {name!r}: use one of {known}, or a path to a `user item item ...` file")


def load(name: str, data_dir_: Path, cache_dir_: Path) -> SequenceData:
    """Load a dataset, using the content-hash cache of its parsed arrays.

    A registered dataset missing from the data directory is downloaded and preprocessed on
    first use, as RecBole does (set HARNESS_AUTO_FETCH=0 to turn that off); when that fails
    (no network, read-only directory) the error says where it looked and how to get it."""
    try:
        path = resolve(name, data_dir_, cache_dir_)
    except DatasetMissing as missing:
        if os.environ.get("HARNESS_AUTO_FETCH", "1") == "0":
            raise
        from harness.data.fetch import fetch

        try:
            path, _ = fetch(missing.name, data_dir_)
        except (HarnessError, OSError) as e:
            raise HarnessError(f"{missing} (automatic download failed: {e})") from None
    digest = file_hash(path)
    cached = cache_dir_ / "datasets" / f"{digest[:16]}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return SequenceData(items=z["items"], offsets=z["offsets"], user_ids=z["user_ids"],
                                    n_items=int(z["n_items"]), source=str(path), content_hash=digest,
                                    warnings=[str(w) for w in z["warnings"]])
        except Exception as e:  # truncated or corrupt (a crash mid-copy, a full disk): parse again
            print(f"warning: cached dataset {cached} is unreadable ({type(e).__name__}); rebuilt from {path}",
                  file=sys.stderr)
    data = load_sequences(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, items=data.items, offsets=data.offsets, user_ids=data.user_ids,
             n_items=data.n_items, warnings=np.array(data.warnings, dtype=str))
    tmp.replace(cached)
    return data


def available(data_dir_: Path) -> list[str]:
    return [n for n, info in DATASETS.items() if (data_dir_ / info.path).is_file()]
