"""What the experiment kinds' tables and figures are made of: per-user metrics from stored
ranks, the comparison table (Table 2 and the ablation) with its tests, per-cell intervals,
the paper's figures, caption notes. Nothing here trains, ranks or opens a storage; the LaTeX
itself is harness/tables.py's, the statistics harness/stats.py's.

Every cell's mean, std over seeds and 95% interval come from the stored per-user ranks of
its runs (seeds x users), so a table is rebuilt, tests included, without retraining. Means
and tests of one dataset use the seeds every compared column has (the caption names any
seed left out). `*` marks IGR-SR's NDCG@10 (the primary metric) when it beats every other
column, Holm-corrected over them, by harness.stats.compare's seed-aware test; the p-values,
differences and relative gains of every metric go to the CSV. `\\dagger` marks a cell any of
whose runs stopped at the epoch cap rather than by early stopping.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics import per_user_ndcg, per_user_recall
from harness.stats import ALPHA, PRIMARY, beats_all, compare, holm, mean_interval, seed_std
from harness.stats import paired_pvalue  # noqa: F401  (its old home: callers import it from here)
from harness.tables import Table, latex_escape, protocol_caption


def label(model: str) -> str:
    """How tables name a model: its registry label (a model no longer registered: its name)."""
    import models

    try:
        return models.get(model).display
    except KeyError:
        return model


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user values of 'recall@K' or 'ndcg@K' from 0-based ranks."""
    name, k = metric.lower().split("@")
    return per_user_recall(ranks, int(k)) if name == "recall" else per_user_ndcg(ranks, int(k))


def significant_gain(proposed: np.ndarray, baselines: dict[str, np.ndarray], alpha: float = ALPHA) -> bool:
    """True when `proposed` beats every baseline with Holm-adjusted p < alpha (harness.stats:
    seed-aware when the arrays are seeds x users, the paired t-test over users for 1-d arrays)."""
    return beats_all({name: compare(proposed, values) for name, values in baselines.items()}, alpha)


def budget_note(train: dict) -> str:
    """The training budget of an experiment's runs, for its caption: a table from capped runs
    must say so, since short caps favour models that learn fast. The training precision too
    (bf16 moves the low digits; ranking is fp32 either way)."""
    if "epochs" not in train:
        return ""
    patience = train.get("patience", "?")
    text = (f"Each run trained at most {train['epochs']} epoch{'s' * (train['epochs'] != 1)}, model chosen by "
            f"validation NDCG@10 (early stop after {patience} epoch{'s' * (patience != 1)} without gain)")
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
    return _save(ablation_plot(frame, title), path)


def ablation_plot(frame: pd.DataFrame, title: str = "Ablation of IGR-SR"):
    """The ablation figure, unsaved: one panel per metric, bars from 0 (an axis starting above 0
    would stretch small gaps into large ones), each bar's value printed above it (and above its
    error bar), so gaps are read from the numbers, not from bar heights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in frame.columns if not c.endswith(" std")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    colors = plt.cm.tab10(np.arange(len(frame.index)))
    x = np.arange(len(frame.index))
    for ax, metric in zip(axes[0], metrics):
        values = frame[metric].astype(float).to_numpy()
        err = frame[f"{metric} std"].astype(float).fillna(0.0).to_numpy() if f"{metric} std" in frame else None
        ax.bar(x, values, yerr=err, color=colors, capsize=3)
        tops = values + (err if err is not None else 0.0)
        for xi, value, top in zip(x, values, tops):
            if not np.isnan(value):
                ax.annotate(f"{value:.4f}", (xi, top), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(x, [str(i) for i in frame.index], rotation=30, ha="right")
        ax.set_title(metric)
        high = float(np.nanmax(tops)) if np.isfinite(tops).any() else 0.0
        ax.set_ylim(bottom=0.0, top=high * 1.15 if high > 0 else 1.0)  # room for the printed values
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


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
            value = grid.values[i, j]
            if pd.isna(value):
                ax.text(j, i, "--", ha="center", va="center", fontsize=7, color="0.4")
            else:  # dark text on the colormap's bright end (viridis' yellow), white on its dark end
                ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=7,
                        color="k" if im.norm(value) > 0.6 else "w")
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
CAPPED = "max epochs"  # how a run's "stopped" attribute starts when it hit the epoch cap (train.FitResult)
LABELS_PROPOSED = {"IGR-SR"}  # the column that gets stars: the paper's model


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
    parameters as a column of its own name), its per-user ranks' artifact, test metrics, how
    its training ended ("stopped") and whether that was the epoch cap ("capped")."""
    rows = []
    for t in trials:
        c = t.user_attrs["cell_info"]
        stopped = str(t.user_attrs.get("stopped") or "")
        cell = {"model": c["model"], "label": label(c["model"]), "dataset": c["dataset"],
                "seed": c["seed"], "noise": c["noise"], "ranks": t.user_attrs.get("artifact_ranks"),
                **{m: t.user_attrs["test"][m] for m in METRICS},
                "stopped": stopped, "capped": stopped.startswith(CAPPED),
                "epochs": t.user_attrs.get("epochs"),
                "train_seconds": t.user_attrs.get("train_seconds", t.user_attrs.get("seconds")),
                "pretrain_key": (t.user_attrs.get("pretrain") or {}).get("key") or t.user_attrs.get("lid_key"),
                "pretrain_epochs": (t.user_attrs.get("pretrain") or {}).get("epochs_run"),
                "pretrain_seconds": (t.user_attrs.get("pretrain") or {}).get("seconds")}
        rows.append({**{k: v for k, v in c["params"].items() if k not in cell}, **cell})
    return pd.DataFrame(rows)


def cost_note(runs: pd.DataFrame) -> str:
    """Each model's training cost in a table's runs, pre-training counted apart (a pre-trained
    LID encoder or LARES stage 1 is shared by every run with its key, and the equal tuning budget
    does not cover it): mean epochs and minutes per run, and the distinct pre-trainings' epochs
    and minutes. Runs stored before costs were recorded are left out of the figures."""
    parts = []
    for lab, group in runs.groupby("label", sort=False):
        known = group.dropna(subset=["train_seconds"]) if "train_seconds" in group else group.iloc[0:0]
        if known.empty:
            continue
        text = (f"{lab} {known['epochs'].astype(float).mean():.0f} epochs / "
                f"{known['train_seconds'].astype(float).mean() / 60:.1f} min per run")
        pre = group.dropna(subset=["pretrain_key"]).drop_duplicates("pretrain_key")
        if not pre.empty:
            epochs = pre["pretrain_epochs"].dropna().astype(float)
            seconds = pre["pretrain_seconds"].dropna().astype(float)
            text += (f" + pre-training ({len(pre)} model{'s' if len(pre) != 1 else ''}"
                     + (f", {epochs.sum():.0f} epochs" if len(epochs) else "")
                     + (f", {seconds.sum() / 60:.1f} min" if len(seconds) else "") + ")")
        parts.append(text)
    if not parts:
        return ""
    return "Training cost (this table's runs; tuning not included): " + "; ".join(parts) + "."


class UserValues:
    """Per-user metric values of runs, read from their stored per-user ranks (each artifact
    once, whatever the number of metrics asked for)."""

    def __init__(self, store):
        self.store = store
        self._ranks: dict[str, np.ndarray] = {}

    def __call__(self, runs: pd.DataFrame, metric: str) -> np.ndarray:
        """Seeds x users values of `metric` for `runs` (one model's runs), rows in seed order."""
        rows = []
        for artifact in runs.sort_values("seed")["ranks"]:
            if artifact not in self._ranks:
                self._ranks[artifact] = load_test_ranks(self.store, artifact)
            rows.append(per_user_metric(self._ranks[artifact], metric))
        return np.stack(rows)


def cell_stats(values: np.ndarray) -> dict:
    """A cell's mean over seeds and users, std of its per-seed means, 95% interval (harness.stats.
    mean_interval) and seed count, for tables and CSVs."""
    est = mean_interval(values)
    return {"mean": est.value, "std": seed_std(np.atleast_2d(values).mean(axis=1)), "ci95_low": est.low,
            "ci95_high": est.high, "n_seeds": int(np.atleast_2d(values).shape[0])}


def common_seeds(groups) -> list:
    """The seeds every one of the groups (frames with a "seed" column) has, sorted."""
    sets = [set(g["seed"]) for g in groups]
    return sorted(set.intersection(*sets)) if sets else []


def seeds_note(common: list, every: list, what: str = "column") -> str:
    """A caption sentence when some runs' seeds were left out of the means and tests."""
    dropped = sorted(set(every) - set(common))
    if not dropped:
        return ""
    names = ", ".join(str(s) for s in dropped)
    return (f"Means and tests use the {len(common)} seed{'s' if len(common) != 1 else ''} every {what} has; "
            f"seed{'s' if len(dropped) > 1 else ''} {names} of some {what}s left out.")


def comparison_table(runs: pd.DataFrame, store, kind: str, mask_history: bool, max_len: int = 50,
                     note: str = "") -> Table:
    """Rows (dataset, metric), columns models/variants; mean (+- std over seeds) over the seeds
    common to every column of a dataset; `*` on IGR-SR's NDCG@10 where it beats every other
    column (harness.stats.beats_all); a dagger on a column whose runs hit the epoch cap. The
    CSV adds per cell its 95% interval and seed count and, for every other column, IGR-SR's
    difference and relative gain over it with their intervals, the seed-aware p-value, its
    Holm adjustment (over the other columns, per metric), the user-level p-value of the
    seed-averaged values and the number of seeds IGR-SR was ahead in."""
    labels = list(dict.fromkeys(runs["label"]))
    index = pd.MultiIndex.from_tuples([(d, SHOWN[m]) for d in dict.fromkeys(runs["dataset"]) for m in METRICS],
                                      names=["Dataset", "Metric"])
    what = "Variant" if kind == "ablate" else "Model"
    mean = pd.DataFrame(index=index, columns=pd.Index(labels, name=what), dtype=float)
    std, low, high = mean.copy(), mean.copy(), mean.copy()
    stars = pd.DataFrame(False, index=index, columns=mean.columns)
    daggers = stars.copy()
    extra: dict[tuple, dict] = {}
    values = UserValues(store)
    notes, seeds_used, users_only = [], [], False
    several = runs["dataset"].nunique() > 1
    for dataset, group in runs.groupby("dataset", sort=False):
        by_label = dict(tuple(group.groupby("label", sort=False)))
        common = common_seeds(by_label.values())
        if common:
            by_label = {lbl: g[g["seed"].isin(common)] for lbl, g in by_label.items()}
            dropped = seeds_note(common, list(group["seed"]))
        else:
            dropped = "No seed is common to every column: means over each column's own seeds, no test."
        if dropped:
            notes.append(f"{latex_escape(str(dataset))}: {dropped}" if several else dropped)
        seeds_used.append(max(g["seed"].nunique() for g in by_label.values()))
        proposed = next((lbl for lbl in labels if lbl in LABELS_PROPOSED and lbl in by_label), None)
        for lbl, g in by_label.items():
            daggers.loc[pd.IndexSlice[dataset, :], lbl] = bool(g["capped"].any())
        for metric in METRICS:
            row = (dataset, SHOWN[metric])
            x = {lbl: values(g, metric) for lbl, g in by_label.items()}
            for lbl, v in x.items():
                s = cell_stats(v)
                mean.loc[row, lbl], std.loc[row, lbl] = s["mean"], s["std"]
                low.loc[row, lbl], high.loc[row, lbl] = s["ci95_low"], s["ci95_high"]
                extra[(*row, lbl)] = {"n_seeds": s["n_seeds"]}
            if proposed is None or not common or len(x) < 2:
                continue
            tests = {lbl: compare(x[proposed], v) for lbl, v in x.items() if lbl != proposed}
            users_only |= not all(c.seed_aware for c in tests.values())
            for (lbl, c), p_holm in zip(tests.items(), holm([c.pvalue for c in tests.values()])):
                extra[(*row, lbl)].update({
                    "vs": proposed, "diff": c.diff.value, "diff_ci95_low": c.diff.low, "diff_ci95_high": c.diff.high,
                    "gain_pct": c.gain_pct.value, "gain_ci95_low": c.gain_pct.low, "gain_ci95_high": c.gain_pct.high,
                    "p": c.pvalue, "p_holm": p_holm, "p_users": c.pvalue_users, "seeds_ahead": c.seeds_ahead})
            if metric == PRIMARY:
                stars.loc[row, proposed] = beats_all(tests)
    seeds = int(max(seeds_used))
    extra_frame = pd.DataFrame.from_dict(extra, orient="index")
    extra_frame.index = pd.MultiIndex.from_tuples(extra_frame.index, names=[*index.names, what])
    counts = [c for c in ("n_seeds", "seeds_ahead") if c in extra_frame]
    extra_frame[counts] = extra_frame[counts].astype("Int64")
    title = "Ablation of IGR-SR" if kind == "ablate" else "Overall performance"
    caption = f"{title} (test set). " + protocol_caption(
        " ".join([*notes, note]).strip(), seeds=seeds, mask_history=mask_history, max_len=max_len, primary=True,
        stars=bool(LABELS_PROPOSED.intersection(labels)), intervals=True, users_only=users_only or seeds < 2,
        daggers=bool(daggers.to_numpy().any()))
    return Table(mean=mean, std=std, stars=stars, low=low, high=high, daggers=daggers,
                 extra=extra_frame, caption=caption, label=f"tab:{kind}")
