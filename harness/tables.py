"""The one LaTeX table writer, and the marks and captions every table shares.

Every table the harness writes (Table 2 and the ablation, Table 3, the sensitivity grid, a
study's top trials) is a frame of cell strings rendered by pandas' `Styler.to_latex`: booktabs
rules, caption and label, escaping of the row and column labels, a repeated leading row label
(the dataset) printed once. Hand-written here only what the library cannot do:
- a cell's text: bold or underline wraps the number alone, before its `+-std` and `*`
  (Styler's wrapping commands would wrap the whole cell);
- marks compared at the printed precision, so ties share a mark;
- a `\\midrule` between row groups where Styler draws `\\cline` (booktabs has no `\\cline`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def rank_marks(values: pd.Series, decimals: int = 4) -> dict:
    """'best' / 'second' per entry, compared at the printed precision: ties share a mark, and
    the second-best is the next distinct value below the best."""
    shown = values.dropna().astype(float).round(decimals)
    distinct = sorted(set(shown), reverse=True)
    marks = {}
    for key, v in shown.items():
        if v == distinct[0]:
            marks[key] = "best"
        elif len(distinct) > 1 and v == distinct[1]:
            marks[key] = "second"
    return marks


def latex_table(cells: pd.DataFrame, caption: str, label: str = "", column_format: str | None = None) -> str:
    """Render a frame of finished cell strings (LaTeX already) as a booktabs table float."""
    styler = cells.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    if cells.index.nlevels == 1 and not cells.index.name:
        styler = styler.hide(names=True, axis="index")
    grouped = cells.index.nlevels > 1
    tex = styler.to_latex(hrules=True, caption=caption, label=label or None, position="t",
                          position_float="centering", environment="table", multirow_align="naive",
                          clines="skip-last;data" if grouped else None,
                          column_format=column_format or "l" * cells.index.nlevels + "c" * cells.shape[1])
    if grouped:  # booktabs: a midrule between groups, none after the last
        tex = re.sub(r"\\cline\{[0-9-]+\}\n\\bottomrule", r"\\bottomrule", tex)
        tex = re.sub(r"\\cline\{[0-9-]+\}", r"\\midrule", tex)
    return tex


@dataclass
class Table:
    """Rows x columns of means, with optional std and stars, rendered as one booktabs table."""

    mean: pd.DataFrame  # index: row labels (tuples allowed), columns: model / variant names
    std: pd.DataFrame | None = None
    stars: pd.DataFrame | None = None  # bool, same shape
    caption: str = ""
    label: str = ""
    decimals: int = 4
    highlight: str | None = "row"  # bold/underline per "row", per "column", over "all" cells, or None

    def marks(self) -> dict:
        out: dict = {}
        if self.highlight == "all":
            return rank_marks(self.mean.stack(), self.decimals)
        if self.highlight == "row":
            for idx, row in self.mean.iterrows():
                out.update({(idx, c): m for c, m in rank_marks(row, self.decimals).items()})
        elif self.highlight == "column":
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

    def cells(self) -> pd.DataFrame:
        marks = self.marks()
        return pd.DataFrame([[self.cell(idx, c, marks.get((idx, c))) for c in self.mean.columns]
                             for idx in self.mean.index], index=self.mean.index, columns=self.mean.columns)

    def to_latex(self) -> str:
        return latex_table(self.cells(), self.caption, self.label)

    def to_csv(self, path: Path) -> None:
        frame = self.mean.copy()
        if self.std is not None:
            frame = frame.join(self.std.add_suffix(" std"))
        if self.stars is not None:
            frame = frame.join(self.stars.add_suffix(" p<0.01"))
        frame.to_csv(path)


def protocol_caption(split_note: str = "", seeds: int = 1, mask_history: bool = False, max_len: int = 50,
                     stars: bool = True, marks: bool = True) -> str:
    masking = "history items masked" if mask_history else "history items not masked"
    seeds_note = f"mean $\\pm$ std over {seeds} seeds" if seeds > 1 else "one seed"
    text = (f"Leave-one-out split, every training prefix a sample, history $\\le$ {max_len}; full ranking "
            f"over all items ({masking}); {seeds_note}.")
    if marks:
        text += " Best in bold, second underlined."
    if stars:
        text += (" $^*$: paired t-test over per-user metrics (seeds pooled), p $<$ 0.01 against the best "
                 "other column.")
    return f"{text} {split_note}".strip()


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
