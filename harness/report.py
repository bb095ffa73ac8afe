"""What the experiment kinds' tables and figures are made of: per-user metrics from stored
ranks, paired t-tests, the comparison table (Table 2 and the ablation), the paper's figures,
caption notes. Nothing here trains, ranks or opens a storage; the LaTeX itself is
harness/tables.py's.

Significance follows the paper: a paired t-test over per-user metrics of the same users
(seeds pooled by concatenating each seed's per-user array in the same user order), `*` on
the proposed model's cell when its gain over the best baseline has p < 0.01.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics import per_user_ndcg, per_user_recall
from harness.tables import Table, latex_escape, protocol_caption

def label(model: str) -> str:
    """How tables name a model: its registry label (a model no longer registered: its name)."""
    import models

    try:
        return models.get(model).display
    except KeyError:
        return model

ALPHA = 0.01


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user values of 'recall@K' or 'ndcg@K' from 0-based ranks."""
    name, k = metric.lower().split("@")
    return per_user_recall(ranks, int(k)) if name == "recall" else per_user_ndcg(ranks, int(k))


def paired_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test p-value of a vs b (same users, same order)."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    if np.allclose(a, b):
        return 1.0
    return float(ttest_rel(a, b).pvalue)


def significant_gain(proposed: np.ndarray, baselines: dict[str, np.ndarray], alpha: float = ALPHA) -> bool:
    """True when `proposed` beats the best baseline (by mean) with paired p < alpha."""
    if not baselines:
        return False
    best = max(baselines.values(), key=lambda v: float(np.mean(v)))
    return float(np.mean(proposed)) > float(np.mean(best)) and paired_pvalue(proposed, best) < alpha


def budget_note(train: dict) -> str:
    """The training budget of an experiment's runs, for its caption: a table from capped runs
    must say so, since short caps favour models that learn fast. The training precision too
    (bf16 moves the low digits; ranking is fp32 either way)."""
    if "epochs" not in train:
        return ""
    text = (f"Each run trained at most {train['epochs']} epochs, model chosen by validation NDCG@10 "
            f"(early stop after {train.get('patience', '?')} epochs without gain)")
    if train.get("precision"):
        text += f", in {train['precision']} (scores ranked in fp32)"
    return text + "."


def params_note(notes: list[str]) -> str:
    """Where the runs' parameters came from ("best trial of study ...", "paper defaults", a file),
    from the experiment's stored notes ("MODEL on DATASET: ORIGIN")."""
    origins = list(dict.fromkeys(n.split(": ", 1)[-1] for n in notes))
    if not origins:
        return ""
    text = origins[0] if len(origins) == 1 else "; ".join(notes)
    return f"Parameters: {latex_escape(text)}."


def ablation_figure(frame: pd.DataFrame, path: Path, title: str = "Ablation of IGR-SR") -> list[Path]:
    """Grouped bars like the paper's Figure 2: rows = variants, columns = metrics (+ optional
    `<metric> std` columns for error bars). Writes .pdf and .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in frame.columns if not c.endswith(" std")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    colors = plt.cm.tab10(np.arange(len(frame.index)))
    for ax, metric in zip(axes[0], metrics):
        err = frame[f"{metric} std"] if f"{metric} std" in frame else None
        ax.bar(range(len(frame.index)), frame[metric], yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(frame.index)), [str(i) for i in frame.index], rotation=30, ha="right")
        ax.set_title(metric)
        low, high = float(frame[metric].min()), float(frame[metric].max())
        ax.set_ylim(max(0.0, low - 0.25 * (high - low + 1e-9) - 0.1 * low), high * 1.08)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def sensitivity_figure(grid: pd.DataFrame, path: Path, metric: str = "Recall@10") -> list[Path]:
    """k x m heat map like the paper's Figure 3 (index: k, columns: m). Writes .pdf and .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    im = ax.imshow(grid.values, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    ax.set_xlabel("m (<intent> tokens)")
    ax.set_ylabel("k (prefix tokens)")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not pd.isna(grid.values[i, j]):
                ax.text(j, i, f"{grid.values[i, j]:.4f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{metric} over k and m")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".pdf"), path.with_suffix(".png")]
    fig.savefig(out[0])
    fig.savefig(out[1], dpi=150)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------ from the storage

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SHOWN = {"recall@10": "Recall@10", "recall@20": "Recall@20", "ndcg@10": "NDCG@10", "ndcg@20": "NDCG@20"}


def load_test_ranks(store, artifact_id: str) -> np.ndarray:
    import io

    from optuna.artifacts.exceptions import ArtifactNotFound

    from harness.errors import HarnessError

    try:
        reader = store.open_reader(artifact_id)
    except ArtifactNotFound:
        raise HarnessError(f"per-user ranks {artifact_id} not found in the artifact store: was the experiment "
                           "run with another --results-dir?") from None
    with reader:
        return np.load(io.BytesIO(reader.read()))["test_ranks"]


def runs_frame(trials) -> pd.DataFrame:
    """One row per finished cell: what it was (model, label, dataset, seed, noise, each of its
    parameters as a column of its own name), its per-user ranks' artifact and test metrics."""
    rows = []
    for t in trials:
        c = t.user_attrs["cell_info"]
        cell = {"model": c["model"], "label": label(c["model"]), "dataset": c["dataset"],
                "seed": c["seed"], "noise": c["noise"], "ranks": t.user_attrs.get("artifact_ranks"),
                **{m: t.user_attrs["test"][m] for m in METRICS}}
        rows.append({**{k: v for k, v in c["params"].items() if k not in cell}, **cell})
    return pd.DataFrame(rows)


def comparison_table(runs: pd.DataFrame, store, kind: str, mask_history: bool, max_len: int = 50,
                     note: str = "") -> Table:
    """Rows (dataset, metric), columns models/variants; mean (+- std) over seeds; `*` on IGR-SR
    where its gain over the best other column is significant (paired, seeds pooled)."""
    labels = list(dict.fromkeys(runs["label"]))
    index = pd.MultiIndex.from_tuples([(d, SHOWN[m]) for d in dict.fromkeys(runs["dataset"]) for m in METRICS],
                                      names=["Dataset", "Metric"])
    mean = pd.DataFrame(index=index, columns=labels, dtype=float)
    std = mean.copy()
    stars = pd.DataFrame(False, index=index, columns=labels)
    seeds = int(runs.groupby(["dataset", "label"])["seed"].nunique().max())
    for dataset, group in runs.groupby("dataset", sort=False):
        common = sorted(set.intersection(*(set(g["seed"]) for _, g in group.groupby("label"))))
        pooled = {label: np.concatenate([load_test_ranks(store, g.loc[g["seed"] == s, "ranks"].iloc[0])
                                         for s in common]) for label, g in group.groupby("label")} if common else {}
        for metric in METRICS:
            for label, g in group.groupby("label"):
                mean.loc[(dataset, SHOWN[metric]), label] = g[metric].mean()
                std.loc[(dataset, SHOWN[metric]), label] = g[metric].std(ddof=1) if len(g) > 1 else np.nan
            proposed = LABELS_PROPOSED.intersection(pooled)
            if proposed:
                name = next(iter(proposed))
                others = {lbl: per_user_metric(r, metric) for lbl, r in pooled.items() if lbl != name}
                stars.loc[(dataset, SHOWN[metric]), name] = significant_gain(per_user_metric(pooled[name], metric),
                                                                             others)
    title = "Ablation of IGR-SR" if kind == "ablate" else "Overall performance"
    return Table(mean=mean, std=std if seeds > 1 else None, stars=stars,
                 caption=f"{title} (test set). " + protocol_caption(note, seeds=seeds, mask_history=mask_history,
                                                                       max_len=max_len),
                 label=f"tab:{kind}")


LABELS_PROPOSED = {"IGR-SR"}  # the column that gets stars: the paper's model
