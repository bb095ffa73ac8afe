"""The one LaTeX writer: bold/underline at the printed precision, std and stars, booktabs
that compiles, every table kind through it."""
from __future__ import annotations

import shutil
import subprocess

import pandas as pd
import pytest

from harness.tables import Table, latex_table, protocol_caption, rank_marks


def test_rank_marks_with_ties_at_printed_precision():
    row = pd.Series({"a": 0.05001, "b": 0.05004, "c": 0.0400, "d": 0.0400, "e": 0.0300})
    marks = rank_marks(row)  # a and b both print 0.0500: both best; c and d second
    assert marks == {"a": "best", "b": "best", "c": "second", "d": "second"}
    assert rank_marks(pd.Series({"x": 0.1})) == {"x": "best"}


def table_2() -> Table:
    idx = pd.MultiIndex.from_tuples([("Toys", "Recall@10"), ("Toys", "NDCG@10")], names=["Dataset", "Metric"])
    mean = pd.DataFrame({"SASRec": [0.0708, 0.0344], "LARES": [0.0731, 0.0354], "IGR-SR": [0.0802, 0.0372]},
                        index=idx)
    stars = pd.DataFrame(False, index=idx, columns=mean.columns)
    stars.loc[("Toys", "Recall@10"), "IGR-SR"] = True
    return Table(mean=mean, stars=stars, caption=protocol_caption(seeds=1), label="tab:overall")


def test_table_marks_best_bold_second_underlined_star_on_proposed_cell():
    tex = table_2().to_latex()
    recall_row = next(line for line in tex.splitlines() if line.startswith("Toys & Recall@10"))
    assert recall_row == r"Toys & Recall@10 & 0.0708 & \underline{0.0731} & \textbf{0.0802}$^*$ \\"
    ndcg_row = next(line for line in tex.splitlines() if line.startswith(" & NDCG@10"))
    assert ndcg_row.startswith(" & NDCG@10")  # repeated dataset label printed once
    assert r"\textbf{0.0372}" in ndcg_row and "$^*$" not in ndcg_row
    assert r"\toprule" in tex and r"\bottomrule" in tex and "tab:overall" in tex


def test_table_with_std_and_column_highlight(tmp_path):
    mean = pd.DataFrame({"Recall@10": [0.08, 0.07, 0.075]}, index=["IGR-SR", "w/o LID", "w/o ICR"])
    std = pd.DataFrame({"Recall@10": [0.001, 0.002, 0.003]}, index=mean.index)
    t = Table(mean=mean, std=std, highlight="column", caption="x")
    tex = t.to_latex()
    assert r"\textbf{0.0800}{\scriptsize$\pm$0.0010}" in tex
    assert r"\underline{0.0750}" in tex and "w/o LID & 0.0700" in tex
    t.to_csv(tmp_path / "t.csv")
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns) == ["Unnamed: 0", "column", "mean", "std"]
    assert csv["std"].tolist() == [0.001, 0.002, 0.003]


def test_epoch_cap_dagger_beside_the_star_and_one_csv_row_per_cell(tmp_path):
    t = table_2()
    t.daggers = pd.DataFrame(False, index=t.mean.index, columns=t.mean.columns)
    t.daggers.loc[("Toys", "Recall@10"), ["SASRec", "IGR-SR"]] = True
    t.low, t.high = t.mean - 0.001, t.mean + 0.001
    t.mean.columns.name = "Model"
    t.extra = pd.DataFrame({"gain_pct": [13.3]}, index=pd.MultiIndex.from_tuples(
        [("Toys", "Recall@10", "SASRec")], names=["Dataset", "Metric", "Model"]))
    recall_row = next(line for line in t.to_latex().splitlines() if line.startswith("Toys & Recall@10"))
    assert recall_row == r"Toys & Recall@10 & 0.0708$^\dagger$ & \underline{0.0731} & \textbf{0.0802}$^{*\dagger}$ \\"
    t.to_csv(tmp_path / "t.csv")
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns) == ["Dataset", "Metric", "Model", "mean", "ci95_low", "ci95_high", "max_epochs", "star",
                                 "gain_pct"]
    assert len(csv) == 6  # 2 rows x 3 models
    sasrec = csv[(csv["Metric"] == "Recall@10") & (csv["Model"] == "SASRec")].iloc[0]
    assert sasrec["max_epochs"] and not sasrec["star"] and sasrec["gain_pct"] == 13.3
    assert sasrec["ci95_low"] == pytest.approx(0.0698) and sasrec["ci95_high"] == pytest.approx(0.0718)


def test_captions_name_the_primary_metric_the_marks_and_what_the_intervals_cover():
    text = protocol_caption(seeds=3, primary=True, intervals=True, daggers=True)
    assert "NDCG@10 is the primary metric" in text and "Holm" in text and "$^\\dagger$" in text
    assert "test users and training seeds both counted" in text and "relative gain" in text
    one = protocol_caption(seeds=1, intervals=True, users_only=True, stars=False)
    assert "test users only" in one and "relative gain" not in one and "$^*$" not in one
    assert "primary" not in protocol_caption(stars=False)  # the tuning tables keep their caption


def top_trials() -> Table:
    """A study's top trials: one row per trial, its parameters (underscored names) as row labels."""
    idx = pd.MultiIndex.from_tuples([("3", "32", "0.1", "8"), ("5", "64", "0.2", "8"), ("1", "32", "0.1", "4")],
                                    names=["trial", "d_l", "cross_dropout", "k"])
    mean = pd.DataFrame({"valid NDCG@10": [0.10, 0.09, 0.08], "test NDCG@10": [0.10, 0.20, 0.30]}, index=idx)
    return Table(mean=mean, caption=r"Top trials of study paper-igr-sr-toys\_2", label="tab:tune-x", highlight="column")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (Debian texlive-latex-recommended)")
def test_generated_latex_compiles(tmp_path):
    """Unit-sized tables here; tests/test_latex.py compiles every .tex a `harness paper` run writes."""
    idx = pd.MultiIndex.from_tuples([("Toys", "a", "1"), ("Toys", "a", "2"), ("Toys", "b", "1"), ("CDs", "a", "1")],
                                    names=["Data_set", "Method", "k"])
    three_levels = latex_table(pd.DataFrame({"x_1": ["1", "2", "3", "4"]}, index=idx), "cap", "tab:y")
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   + table_2().to_latex() + top_trials().to_latex() + three_levels + "\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_grouped_rows_get_a_midrule_between_groups_and_none_before_the_bottom_rule():
    idx = pd.MultiIndex.from_tuples([("Toys", "SASRec"), ("Toys", "IGR_SR"), ("CDs", "SASRec")],
                                    names=["Dataset", "Method"])
    tex = latex_table(pd.DataFrame({"Clean": ["1", "2", "3"]}, index=idx), "cap", "tab:x")
    lines = tex.splitlines()
    assert r"\cline" not in tex and lines.count(r"\midrule") == 2  # under the header, between datasets
    end = lines.index(r"\bottomrule")
    assert lines[end - 4:end] == [r"Toys & SASRec & 1 \\", r" & IGR\_SR & 2 \\", r"\midrule", r"CDs & SASRec & 3 \\"]


def test_top_trials_escape_the_names_and_get_no_rule_between_trials():
    """Parameter names are the row labels' names, which Styler does not escape; every trial is
    its own row (no group), so no rule between rows: not one \\midrule per changed level."""
    tex = top_trials().to_latex()
    lines = tex.splitlines()
    assert r"trial & d\_l & cross\_dropout & k &  &  \\" in lines
    assert lines.count(r"\midrule") == 1 and "\\midrule \\midrule" not in tex and r"\cline" not in tex
    end = lines.index(r"\bottomrule")
    assert lines[end - 3:end] == [r"3 & 32 & 0.1 & 8 & \textbf{0.1000} & 0.1000 \\",
                                  r"5 & 64 & 0.2 & 8 & \underline{0.0900} & \underline{0.2000} \\",
                                  r"1 & 32 & 0.1 & 4 & 0.0800 & \textbf{0.3000} \\"]


def test_a_deeper_level_changing_within_a_group_gets_a_cmidrule():
    idx = pd.MultiIndex.from_tuples([("Toys", "a", "1"), ("Toys", "a", "2"), ("Toys", "b", "1"), ("CDs", "a", "1")],
                                    names=["Dataset", "Method", "k"])
    lines = latex_table(pd.DataFrame({"v": ["1", "2", "3", "4"]}, index=idx), "cap").splitlines()
    end = lines.index(r"\bottomrule")
    assert lines[end - 6:end] == [r"Toys & a & 1 & 1 \\", r" &  & 2 & 2 \\", r"\cmidrule{2-4}", r" & b & 1 & 3 \\",
                                  r"\midrule", r"CDs & a & 1 & 4 \\"]
