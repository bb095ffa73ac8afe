"""Noisy training data for the robustness experiment (the paper's Table 3; see ARCHITECTURE.md's protocol).

Exactly round(rate x training items) training positions, drawn uniformly over all users'
training parts, get a uniformly random *different* item. The validation and test targets (each
user's last two items) are never touched, so clean and noisy runs are scored on the same
targets. The noisy file is cached by (dataset content hash, rate, seed) and is then an
ordinary dataset file: its own content hash keys the LID encoders pre-trained on it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.sequences import SequenceData, write_sequences


def training_positions(data: SequenceData) -> np.ndarray:
    """Indices into `data.items` of every item before a user's validation target."""
    lengths = data.lengths() - 2
    starts = np.repeat(data.offsets[:-1], lengths)
    first = np.cumsum(lengths) - lengths
    return starts + np.arange(starts.size) - np.repeat(first, lengths)


def perturb(data: SequenceData, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The perturbed flat item array and the positions that were changed."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], not {rate}")
    rng = np.random.default_rng(seed)
    candidates = training_positions(data)
    chosen = np.sort(rng.choice(candidates, size=int(round(rate * candidates.size)), replace=False))
    items = data.items.copy()
    # a uniform draw among the other n_items - 1 ids, so every chosen position really changes
    draw = rng.integers(1, data.n_items, size=chosen.size)
    items[chosen] = draw + (draw >= items[chosen])
    return items, chosen


def noisy_file(data: SequenceData, rate: float, seed: int, cache_dir: Path) -> Path:
    path = cache_dir / "noisy" / f"{data.content_hash[:16]}-rate{rate:g}-seed{seed}.txt"
    if not path.is_file():
        items, _ = perturb(data, rate, seed)
        write_sequences(path, [items[a:b] for a, b in zip(data.offsets[:-1], data.offsets[1:])])
    return path
