"""Tables and figures from stored per-user results: paired t-tests, booktabs LaTeX with best in
bold and second underlined, and the paper's figures. Nothing here trains or ranks anything.

Significance follows the paper: a paired t-test over per-user metrics of the same users
(seeds pooled by concatenating each seed's per-user array in the same user order), `*` on
the proposed model's cell when its gain over the best baseline has p < 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics import per_user_ndcg, per_user_recall

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


def rank_marks(values: pd.Series, decimals: int = 4) -> dict:
    """'best' / 'second' per entry, compared at the printed precision: ties share a mark, and
    the second-best is the next distinct value below the best."""
    shown = values.dropna().round(decimals)
    distinct = sorted(set(shown), reverse=True)
    marks = {}
    for key, v in shown.items():
        if v == distinct[0]:
            marks[key] = "best"
        elif len(distinct) > 1 and v == distinct[1]:
            marks[key] = "second"
    return marks


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


@dataclass
class Table:
    """Rows x columns of means, with optional std and stars, rendered as one booktabs table."""

    mean: pd.DataFrame  # index: row labels (tuples allowed), columns: model / variant names
    std: pd.DataFrame | None = None
    stars: pd.DataFrame | None = None  # bool, same shape
    caption: str = ""
    label: str = ""
    decimals: int = 4
    highlight: str = "row"  # bold/underline per "row", per "column" or over "all" cells

    def marks(self) -> dict:
        out = {}
        if self.highlight == "all":
            return rank_marks(self.mean.stack(), self.decimals)
        if self.highlight == "row":
            for idx, row in self.mean.iterrows():
                out.update({(idx, c): m for c, m in rank_marks(row, self.decimals).items()})
        else:
            for c in self.mean.columns:
                out.update({(i, c): m for i, m in rank_marks(self.mean[c], self.decimals).items()})
        return out

    def cell(self, idx, col, mark: str | None) -> str:
        v = self.mean.loc[idx, col]
        if pd.isna(v):
            return "--"
        text = f"{v:.{self.decimals}f}"
        if mark == "best":
            text = rf"\textbf{{{text}}}"
        elif mark == "second":
            text = rf"\underline{{{text}}}"
        if self.std is not None and not pd.isna(self.std.loc[idx, col]):
            text += rf"{{\scriptsize$\pm${self.std.loc[idx, col]:.{self.decimals}f}}}"
        if self.stars is not None and bool(self.stars.loc[idx, col]):
            text += r"$^*$"
        return text

    def to_latex(self) -> str:
        marks = self.marks()
        index_names = list(self.mean.index.names) if self.mean.index.nlevels > 1 else [self.mean.index.name or ""]
        n_idx = len(index_names)
        cols = "l" * n_idx + "c" * len(self.mean.columns)
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{self.caption}}}"]
        if self.label:
            lines.append(rf"\label{{{self.label}}}")
        lines += [rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                  " & ".join([latex_escape(str(n)) for n in index_names]
                             + [latex_escape(str(c)) for c in self.mean.columns]) + r" \\", r"\midrule"]
        previous = None
        for idx in self.mean.index:
            keys = idx if isinstance(idx, tuple) else (idx,)
            # print a repeated leading label (e.g. the dataset) only on its first row
            shown = [latex_escape(str(k)) if (previous is None or i > 0 or k != previous[0]) else ""
                     for i, k in enumerate(keys)]
            if previous is not None and n_idx > 1 and keys[0] != previous[0]:
                lines.append(r"\midrule")
            cells = [self.cell(idx, c, marks.get((idx, c))) for c in self.mean.columns]
            lines.append(" & ".join(shown + cells) + r" \\")
            previous = keys
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def to_csv(self, path: Path) -> None:
        frame = self.mean.copy()
        if self.std is not None:
            frame = frame.join(self.std.add_suffix(" std"))
        if self.stars is not None:
            frame = frame.join(self.stars.add_suffix(" p<0.01"))
        frame.to_csv(path)


def protocol_caption(split_note: str = "", seeds: int = 1, mask_history: bool = False, max_len: int = 50,
                     stars: bool = True) -> str:
    masking = "history items masked" if mask_history else "history items not masked"
    seeds_note = f"mean $\\pm$ std over {seeds} seeds" if seeds > 1 else "one seed"
    text = (f"Leave-one-out split, every training prefix a sample, history $\\le$ {max_len}; full ranking "
            f"over all items ({masking}); {seeds_note}. Best in bold, second underlined.")
    if stars:
        text += (" $^*$: paired t-test over per-user metrics (seeds pooled), p $<$ 0.01 against the best "
                 "other column.")
    return f"{text} {split_note}".strip()


def budget_note(train: dict) -> str:
    """The training budget of an experiment's runs, for its caption: a table from capped runs
    must say so, since short caps favour models that learn fast."""
    if "epochs" not in train:
        return ""
    return (f"Each run trained at most {train['epochs']} epochs, model chosen by validation NDCG@10 "
            f"(early stop after {train.get('patience', '?')} epochs without gain).")


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
        raise HarnessError(f"per-user ranks {artifact_id} not found in the artifact store {getattr(store, '_base_path', '')}"
                           ": was the experiment run with another --results-dir?") from None
    with reader:
        return np.load(io.BytesIO(reader.read()))["test_ranks"]


def runs_frame(trials) -> pd.DataFrame:
    """One row per finished cell: what it was and its test metrics."""
    from harness.experiments import LABELS

    rows = []
    for t in trials:
        c = t.user_attrs["cell_info"]
        p = c["params"]
        rows.append({"model": c["model"], "label": LABELS.get(c["model"], c["model"]), "dataset": c["dataset"],
                     "seed": c["seed"], "noise": c["noise"], "k": p.get("k"), "m": p.get("m"),
                     "ranks": t.user_attrs.get("artifact_ranks"),
                     **{m: t.user_attrs["test"][m] for m in METRICS}})
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


LABELS_PROPOSED = {"IGR-SR"}


NOISE_CAPTIONS = {
    "all": "Noise: that fraction of the items before each user's validation target replaced by random "
           "items, in the training samples and in the histories read at validation and test; targets untouched.",
    "train": "Noise: that fraction of the items before each user's validation target replaced by random "
             "items in the training samples only; validation and test read the clean histories and targets.",
    "eval": "Noise: training on clean data; that fraction of the items before each user's validation target "
            "replaced by random items in the histories read at validation and test; targets untouched.",
}


def robustness_latex(runs: pd.DataFrame, mask_history: bool, max_len: int = 50,
                     note: str = "", noise_on: str = "all") -> tuple[str, pd.DataFrame]:
    """Table 3: clean vs noisy Recall@10 and the relative drop, per dataset and model."""
    rows = []
    for (dataset, label), g in runs.groupby(["dataset", "label"], sort=False):
        clean = g.loc[g["noise"] == 0, "recall@10"].mean()
        noisy_rates = sorted(r for r in g["noise"].unique() if r > 0)
        for rate in noisy_rates:
            noisy = g.loc[g["noise"] == rate, "recall@10"].mean()
            rows.append({"dataset": dataset, "model": label, "noise": rate, "clean": clean, "noisy": noisy,
                         "drop_pct": 100 * (clean - noisy) / clean if clean else np.nan})
    frame = pd.DataFrame(rows)
    seeds = int(runs.groupby(["dataset", "label", "noise"])["seed"].nunique().max()) if len(runs) else 0
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{Robustness: Recall@10 on clean and noisy data (relative drop). "
             rf"{protocol_caption(seeds=seeds, mask_history=mask_history, max_len=max_len).split(' Best in bold')[0]} "
             rf"{NOISE_CAPTIONS[noise_on]} {note}".rstrip() + "}", r"\label{tab:robustness}", r"\begin{tabular}{llcc}", r"\toprule",
             r"Dataset & Method & Clean & Noisy \\", r"\midrule"]
    for _, r in frame.iterrows():
        lines.append(rf"{latex_escape(str(r['dataset']))} & {latex_escape(str(r['model']))} & {r['clean']:.4f} & "
                     rf"{r['noisy']:.4f} ($\downarrow${r['drop_pct']:.1f}\%, +{100 * r['noise']:.0f}\% noise) \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n", frame


def build_report(storage_url: str | None, results_dir: Path, out: Path) -> list[tuple[str, Path, object]]:
    """Every experiment study in the storage -> .tex + .csv (+ figures) under `out`.
    Returns (study name, tex path, rich renderable) per experiment."""
    import optuna

    from harness.experiments import completed_cells, experiment_studies
    from harness.store import artifact_store, open_storage

    storage = open_storage(storage_url)
    store = artifact_store(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, exp in experiment_studies(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        runs = runs_frame(completed_cells(study))
        if runs.empty:
            continue
        mask = bool(exp.get("train", {}).get("mask_history", False))
        max_len = int(exp.get("train", {}).get("max_len", 50))
        kind = exp["kind"]
        note = f'{budget_note(exp.get("train", {}))} {params_note(exp.get("notes", []))}'.strip()
        base = out / name.replace("/", "_")
        if kind in ("ablate", "compare"):
            table = comparison_table(runs, store, kind, mask, max_len, note)
            base.with_suffix(".tex").write_text(table.to_latex())
            table.to_csv(base.with_suffix(".csv"))
            if kind == "ablate":
                first = runs["dataset"].iloc[0]
                frame = table.mean.loc[first].T
                if table.std is not None:
                    frame = frame.join(table.std.loc[first].T.add_suffix(" std"))
                ablation_figure(frame, base.with_name(base.name + "-figure"), f"Ablation of IGR-SR on {first}")
            # many models: one row per model, so the terminal table fits an 80-column screen
            shown = table.mean.T if table.mean.shape[1] > 5 else table.mean
            made.append((name, base.with_suffix(".tex"), rich_table(shown, name)))
        elif kind == "robustness":
            tex, frame = robustness_latex(runs, mask, max_len, note, exp.get("noise_on", "all"))
            base.with_suffix(".tex").write_text(tex)
            frame.to_csv(base.with_suffix(".csv"), index=False)
            made.append((name, base.with_suffix(".tex"), rich_table(frame.set_index(["dataset", "model"]), name,
                                                                   {"noise": ".2f", "drop_pct": ".1f"})))
        elif kind == "sensitivity":
            grid = runs.groupby(["k", "m"])["recall@10"].mean().unstack("m")
            grid.to_csv(base.with_suffix(".csv"))
            table = Table(mean=grid.rename(index=lambda k: f"k={k}", columns=lambda m: f"m={m}"),
                          highlight="all", caption="Recall@10 (test) over prefix tokens k and intent tokens m. "
                          + protocol_caption(note, seeds=int(runs.groupby(["k", "m"])["seed"].nunique().max()),
                                             mask_history=mask, max_len=max_len, stars=False),
                          label="tab:sensitivity")
            base.with_suffix(".tex").write_text(table.to_latex())
            sensitivity_figure(grid, base.with_name(base.name + "-figure"))
            made.append((name, base.with_suffix(".tex"), rich_table(grid, name)))
    return made


def rich_table(frame: pd.DataFrame, title: str, formats: dict[str, str] | None = None):
    """A terminal table of `frame`; floats as .4f unless `formats` names the column's spec."""
    from rich.table import Table as RichTable

    t = RichTable(title=title)
    names = [str(n or "") for n in (frame.index.names if frame.index.nlevels > 1 else [frame.index.name])]
    for n in names:
        t.add_column(n)
    for c in frame.columns:
        t.add_column(" ".join(map(str, c)) if isinstance(c, tuple) else str(c), justify="right")
    specs = [(formats or {}).get(c, ".4f") for c in frame.columns]
    for idx, row in frame.iterrows():
        keys = idx if isinstance(idx, tuple) else (idx,)
        t.add_row(*[str(k) for k in keys], *[f"{v:{spec}}" if isinstance(v, (float, np.floating)) else str(v)
                                             for v, spec in zip(row, specs)])
    return t
