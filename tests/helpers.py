"""Small helpers shared by test files (pytest puts tests/ on sys.path)."""
from __future__ import annotations

from collections import Counter


def achievable_accuracy(batch) -> float:
    """Top-1 accuracy a perfect memoriser gets: equal histories with different targets cap it."""
    targets: dict[tuple, Counter] = {}
    for i in range(batch.size):
        row = batch.items[i].tolist()
        for j, t in enumerate(batch.targets[i].tolist()):
            if t > 0:
                targets.setdefault(tuple(row[: j + 1]), Counter())[t] += 1
    return sum(c.most_common(1)[0][1] for c in targets.values()) / sum(sum(c.values()) for c in targets.values())
