"""The one LaTeX table writer, and the marks and captions every table shares.

Every table the harness writes (Table 2 and the ablation, Table 3, the sensitivity grid, a
study's top trials) is a frame of cell strings rendered by pandas' `Styler.to_latex`: booktabs
rules, caption and label, escaping of the row and column labels, a repeated leading row label
(the dataset) printed once. Hand-written here only what the library cannot do:
- a cell's text: bold or underline wraps the number alone, before its `+-std` and its marks
  (`*` significant, `\\dagger` a run hit the epoch cap; Styler's wrapping commands would wrap
  the whole cell);
- marks compared at the printed precision, so ties share a mark;
- the axes' names escaped (Styler escapes the labels only: a parameter `d_l` as a row label's name);
- one `\\midrule` between row groups where Styler draws a `\\cline` per changed level (booktabs
  has no `\\cline`), and no rules at all when the first level never repeats (a trial number).
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
    """Render a frame of finished cell strings (LaTeX already) as a booktabs table float.

    Row and column labels and the axes' names are escaped (Styler escapes the labels only). Rows
    are grouped by the first index level when a value of it repeats (a dataset over its metrics
    or models): one `\\midrule` between groups, a `\\cmidrule` where a deeper level changes
    within one; a first level that never repeats (a trial number) is no grouping and gets no rules."""
    escape_names = lambda names: [latex_escape(str(n)) if n is not None else None for n in names]  # noqa: E731
    cells = cells.rename_axis(index=escape_names(cells.index.names), columns=escape_names(cells.columns.names))
    styler = cells.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    if cells.index.nlevels == 1 and not cells.index.name:
        styler = styler.hide(names=True, axis="index")
    grouped = cells.index.nlevels > 1 and bool(cells.index.get_level_values(0).duplicated().any())
    tex = styler.to_latex(hrules=True, caption=caption, label=label or None, position="t",
                          position_float="centering", environment="table", multirow_align="naive",
                          clines="skip-last;data" if grouped else None,
                          column_format=column_format or "l" * cells.index.nlevels + "c" * cells.shape[1])
    if grouped:  # Styler writes one \cline per level that changes, on one line; booktabs has none
        tex = re.sub(r"^(?:\\cline\{[0-9-]+\} ?)+\n", _group_rule, tex, flags=re.M)
        tex = re.sub(r"\\c?midrule(?:\{[0-9-]+\})?\n\\bottomrule", r"\\bottomrule", tex)  # none after the last
    return tex


def _group_rule(line: re.Match) -> str:
    """A line of `\\cline{a-b}`: a `\\midrule` when the first level changes, else a `\\cmidrule`
    from the outermost level that changes."""
    spans = [tuple(map(int, m)) for m in re.findall(r"\\cline\{(\d+)-(\d+)\}", line.group(0))]
    start = min(a for a, _ in spans)
    return "\\midrule\n" if start == 1 else f"\\cmidrule{{{start}-{max(b for _, b in spans)}}}\n"


@dataclass
class Table:
    """Rows x columns of means, with optional std, stars, epoch-cap daggers and 95% intervals,
    rendered as one booktabs table; its CSV has one row per cell with every number it has."""

    mean: pd.DataFrame  # index: row labels (tuples allowed), columns: model / variant names
    std: pd.DataFrame | None = None
    stars: pd.DataFrame | None = None  # bool, same shape
    caption: str = ""
    label: str = ""
    decimals: int = 4
    highlight: str | None = "row"  # bold/underline per "row", per "column", over "all" cells, or None
    low: pd.DataFrame | None = None  # 95% interval, same shape as mean (CSV only)
    high: pd.DataFrame | None = None
    daggers: pd.DataFrame | None = None  # bool, same shape: a run of the cell stopped at the epoch cap
    extra: pd.DataFrame | None = None  # more CSV columns, indexed like the stacked cells (row levels + column)

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
        sup = [sign for sign, frame in (("*", self.stars), (r"\dagger", self.daggers))
               if frame is not None and bool(frame.loc[idx, col])]
        if len(sup) == 1:
            text += f"$^{sup[0]}$"
        elif sup:
            text += f"$^{{{''.join(sup)}}}$"
        return text

    def cells(self) -> pd.DataFrame:
        marks = self.marks()
        columns = self.mean.columns.set_names([None] * self.mean.columns.nlevels)  # their name is the CSV's
        return pd.DataFrame([[self.cell(idx, c, marks.get((idx, c))) for c in self.mean.columns]
                             for idx in self.mean.index], index=self.mean.index, columns=columns)

    def to_latex(self) -> str:
        return latex_table(self.cells(), self.caption, self.label)

    def long(self) -> pd.DataFrame:
        """One row per cell (row labels, then the column's name): mean, std, ci95_low, ci95_high,
        max_epochs (a run hit the epoch cap), star, then the `extra` columns."""
        column = self.mean.columns.name or "column"
        parts = {"mean": self.mean, "std": self.std, "ci95_low": self.low, "ci95_high": self.high,
                 "max_epochs": self.daggers, "star": self.stars}
        frame = pd.concat({name: part.rename_axis(columns=column).stack() for name, part in parts.items()
                           if part is not None}, axis=1)
        if self.extra is not None:
            frame = frame.join(self.extra)
        return frame

    def to_csv(self, path: Path) -> None:
        self.long().to_csv(path)


def protocol_caption(split_note: str = "", seeds: int = 1, mask_history: bool = False, max_len: int = 50,
                     stars: bool = True, marks: bool = True, primary: bool = False, intervals: bool = False,
                     users_only: bool = False, daggers: bool = False) -> str:
    """The protocol sentence every table shares, plus what its marks mean: `primary` says NDCG@10
    is the primary metric, `intervals` that the CSV has 95% intervals (`users_only`: they, and
    the test, cover user sampling only, one seed leaving training randomness unestimated),
    `daggers` what the epoch-cap mark means."""
    masking = "history items masked" if mask_history else "history items not masked"
    seeds_note = f"mean $\\pm$ std over {seeds} seeds" if seeds > 1 else "one seed"
    text = (f"Leave-one-out split, every training prefix a sample, history $\\le$ {max_len}; full ranking "
            f"over all items ({masking}); {seeds_note}.")
    if primary:
        text += " NDCG@10 is the primary metric, fixed in advance."
    if marks:
        text += " Best in bold, second underlined."
    if stars:
        text += (" $^*$: IGR-SR above every other column on NDCG@10, two-sided p $<$ 0.01 after Holm's "
                 "correction over those columns, by a t-test whose variance counts both the test users and the "
                 "seed-to-seed spread of each model (Welch-Satterthwaite degrees of freedom).")
    if daggers:
        text += (" $^\\dagger$: a run of that cell stopped at the epoch cap, not by early stopping (it may be "
                 "undertrained).")
    if intervals:
        source = (f"test users only{', as is the test' if stars else ''}: with one seed, training randomness "
                  "cannot be estimated" if users_only else "test users and training seeds both counted")
        text += (f" The table's CSV holds each cell's 95\\% interval ({source})"
                 + (" and, per other column, IGR-SR's relative gain with its interval and the p-values." if stars
                    else "."))
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
