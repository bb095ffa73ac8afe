"""The significance test before and after the seed-aware one, on the stored runs of a compare study.

    python scripts/pvalues_before_after.py --storage S.journal --results-dir R --study compare-toys \
        --first sasrec --second gru4rec [--metric ndcg@10]

Reads the cells' per-user test ranks (nothing is retrained) and prints, for FIRST against
SECOND on one metric: each model's mean with its 95% interval (harness.stats.mean_interval:
test users and seeds both counted) and with the old interval (users only, seeds pooled); the
old p-value (every seed's users concatenated, one paired t-test over users: the test the
harness used before) and the new seed-aware one; the difference and relative gain with their
intervals. A reproduction aid for docs/results.md, not part of the harness.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import optuna
from scipy import stats as sps

from harness.experiments import completed_cells
from harness.report import UserValues, runs_frame
from harness.stats import compare, mean_interval, paired_pvalue
from harness.store import artifact_store, open_storage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", required=True)
    ap.add_argument("--results-dir", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--first", required=True)
    ap.add_argument("--second", required=True)
    ap.add_argument("--metric", default="ndcg@10")
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=a.study, storage=open_storage(a.storage))
    runs = runs_frame(completed_cells(study))
    values = UserValues(artifact_store(Path(a.results_dir)))
    x, y = (values(runs[runs["model"] == m], a.metric) for m in (a.first, a.second))
    seeds = min(len(x), len(y))
    x, y = x[:seeds], y[:seeds]
    for name, v in ((a.first, x), (a.second, y)):
        new = mean_interval(v)
        flat = v.ravel()
        half = sps.t.ppf(0.975, flat.size - 1) * flat.std(ddof=1) / np.sqrt(flat.size)
        print(f"{name:10s} {a.metric} {flat.mean():.5f}  per-seed {np.round(v.mean(axis=1), 5).tolist()}  "
              f"95% CI new [{new.low:.5f}, {new.high:.5f}]  old (users pooled) [{flat.mean() - half:.5f}, "
              f"{flat.mean() + half:.5f}]")
    c = compare(x, y)
    print(f"{a.first} vs {a.second}: diff {c.diff.value:+.5f} [{c.diff.low:+.5f}, {c.diff.high:+.5f}], gain "
          f"{c.gain_pct.value:+.2f}% [{c.gain_pct.low:+.2f}, {c.gain_pct.high:+.2f}]; p old (pooled paired t) "
          f"{paired_pvalue(x.ravel(), y.ravel()):.3g}, p new (seed-aware) {c.pvalue:.3g} (df {c.diff.df:.1f}), "
          f"p of seed-averaged users {c.pvalue_users:.3g}; ahead in {c.seeds_ahead} of {c.n_seeds} seeds")


if __name__ == "__main__":
    main()
