"""A seeded synthetic dataset with planted intents, the tests' workhorse.

Items are split into `n_intents` clusters. Each user mixes a few intents (Dirichlet weights)
and walks: with probability `stickiness` it stays in its current intent, else it draws a new
one from its mix; inside an intent the next item is a short step along the cluster's ring
(so there is sequential structure for a model to learn), and with probability `noise` a click
is a uniformly random item instead. Sizes: "tiny" for tests, or the shape of a real dataset
(users, items, mean length) for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data.sequences import write_sequences
from harness.errors import HarnessError


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 300
    items: int = 120
    intents: int = 6
    mean_length: float = 12.0
    intents_per_user: int = 2
    stickiness: float = 0.8
    noise: float = 0.1
    seed: int = 0


SCALES = {
    "tiny": SyntheticSpec(),
    "toys": SyntheticSpec(users=19412, items=11924, intents=64, mean_length=8.6),
    "instrument": SyntheticSpec(users=57439, items=24587, intents=128, mean_length=8.9),
    "cds": SyntheticSpec(users=75258, items=64443, intents=256, mean_length=14.6),
}


def generate(spec: SyntheticSpec) -> list[np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    cluster_of = rng.permutation(spec.items) % spec.intents  # item index -> intent
    members = [np.flatnonzero(cluster_of == c) for c in range(spec.intents)]
    lengths = np.maximum(5, rng.geometric(1.0 / max(spec.mean_length - 4, 1.0), spec.users) + 4)
    lengths = np.minimum(lengths, 200)
    sequences = []
    for n in lengths:
        mine = rng.choice(spec.intents, size=min(spec.intents_per_user, spec.intents), replace=False)
        weights = rng.dirichlet(np.ones(mine.size))
        intent = rng.choice(mine, p=weights)
        pos = rng.integers(len(members[intent]))
        seq, seen = [], set()
        while len(seq) < n:
            if rng.random() >= spec.stickiness:
                intent = rng.choice(mine, p=weights)
                pos = rng.integers(len(members[intent]))
            else:
                pos = (pos + rng.integers(1, 3)) % len(members[intent])
            item = members[intent][pos] if rng.random() >= spec.noise else rng.integers(spec.items)
            if item in seen and len(seen) < spec.items // 2:
                continue  # like the Amazon files: no repeats within a user
            seen.add(item)
            seq.append(item + 1)  # ids are 1-based; 0 is padding
        sequences.append(np.asarray(seq))
    return sequences


def spec_for(name: str) -> SyntheticSpec:
    """`synthetic` (tiny), `synthetic-<scale>`, optionally `...@<seed>`."""
    base, _, seed = name.partition("@")
    scale = base[len("synthetic"):].lstrip("-") or "tiny"
    if scale not in SCALES:
        raise HarnessError(f"unknown synthetic scale {scale!r}: use one of {', '.join(SCALES)}")
    spec = SCALES[scale]
    if seed:
        try:
            spec = SyntheticSpec(**{**spec.__dict__, "seed": int(seed)})
        except ValueError:
            raise HarnessError(f"dataset {name!r}: the seed after '@' must be an integer") from None
    return spec


def synthetic_file(name: str, cache_dir: Path) -> Path:
    """Generate (once) and return the sequence file for a synthetic dataset name."""
    spec = spec_for(name)
    path = cache_dir / "synthetic" / f"{name.split('@')[0]}-seed{spec.seed}.txt"
    if not path.is_file():
        write_sequences(path, generate(spec))
    return path
