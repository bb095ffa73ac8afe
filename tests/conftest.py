"""Shared fixtures: a hand-made sequence file, an isolated cache, and the real data directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The tests' models are tiny: one thread is as fast, and it keeps the suite from fighting a
# training job for the cores (two processes spinning 2 OpenMP threads each on 2 cores is
# many times slower than either alone).
torch.set_num_threads(1)

# The tiny file, user id -> items (oldest first). Item ids are unique within each user, so a
# target can be told apart from the history by its id. Item 10 and 11 are never used, so the
# largest id (12) differs from the number of distinct ids (10).
TINY_LINES = {
    10: [5, 3, 8, 2, 9, 4, 7, 6],  # 8 items: 5 training samples, long enough for max_len=3 windows
    20: [1, 2, 3],  # 3 items: no training sample, only valid (1 -> 2) and test (1 2 -> 3)
    30: [6, 1, 4, 12, 2],  # 5 items: 2 training samples
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own HARNESS_CACHE_DIR, so nothing touches ~/.cache."""
    cache = tmp_path_factory.mktemp("harness-cache")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    """TINY_LINES as a `user item item ...` file, with a trailing blank line."""
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"{u} " + " ".join(map(str, seq)) + "\n" for u, seq in TINY_LINES.items()) + "\n")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The real data directory (HARNESS_DATA_DIR, else <repo>/../shared/data); skip if Toys is absent."""
    env = os.environ.get("HARNESS_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "toys" / "Toys_and_Games.txt").is_file():
        pytest.skip(f"real data not available: {root / 'toys' / 'Toys_and_Games.txt'} is missing")
    return root


SMALL_ITEMS, SMALL_MAX_LEN = 40, 20


@pytest.fixture(scope="module")
def small_split():
    """60 synthetic users over 40 items (planted intents), split with histories of <= 20."""
    import numpy as np

    from harness.data.sequences import SequenceData
    from harness.data.split import LeaveOneOut
    from harness.data.synthetic import SyntheticSpec, generate

    seqs = generate(SyntheticSpec(users=60, items=SMALL_ITEMS, intents=4, mean_length=10, seed=1))
    lengths = [len(s) for s in seqs]
    flat = np.concatenate(seqs).astype(np.int64)
    d = SequenceData(items=flat, offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     user_ids=np.arange(1, len(seqs) + 1), n_items=SMALL_ITEMS)
    return LeaveOneOut(d, max_len=SMALL_MAX_LEN)
