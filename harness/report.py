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
    highlight: str = "row"  # bold/underline per "row" or per "column"

    def marks(self) -> dict:
        out = {}
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


def protocol_caption(split_note: str = "", seeds: int = 1, mask_history: bool = False) -> str:
    masking = "history items masked" if mask_history else "history items not masked"
    seeds_note = f"mean $\\pm$ std over {seeds} seeds" if seeds > 1 else "one seed"
    return (f"Leave-one-out split, every training prefix a sample, history $\\le$ 50; full ranking over "
            f"all items ({masking}); {seeds_note}. Best in bold, second underlined; $^*$: paired t-test "
            f"over per-user metrics (seeds pooled), p $<$ 0.01 against the best baseline. {split_note}").strip()


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
