"""Shared fixtures: a hand-made sequence file, an isolated cache, and the real data directory."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
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


# ---- a throwaway PostgreSQL server: initdb + pg_ctl on a free loopback port in a temporary
# directory (as the `postgres` user when run as root: initdb refuses root)

def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may hold links to some tools only
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture(scope="session")
def postgres_server():
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (initdb): apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the psycopg2 client is not installed: pip install psycopg2-binary")
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="harness-pg-"))  # not under pytest's 0700 tmp dirs
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            shutil.chown(root, "postgres")
        except LookupError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_postgres, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "harness", "--no-sync")
    pg("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "harness", "optuna")
        yield {"url": f"postgresql://harness@127.0.0.1:{port}/optuna",
               "restart": lambda: pg("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-m", "fast", "-w",
                                  "restart")}
    finally:
        pg("pg_ctl", "-D", str(root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    return postgres_server["url"]


@pytest.fixture
def postgres_restart(postgres_server):
    """Restart the server (fast shutdown: open connections are cut, as in a real restart)."""
    return postgres_server["restart"]
