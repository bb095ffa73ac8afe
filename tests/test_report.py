"""Report building blocks: paired t-tests, stars, bold/underline, LaTeX that compiles, figures."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from harness.report import (Table, ablation_figure, paired_pvalue, per_user_metric, protocol_caption,
                            rank_marks, sensitivity_figure, significant_gain)


def test_paired_pvalue_matches_the_textbook_formula():
    a = np.array([0.30, 0.25, 0.40, 0.10, 0.55, 0.20])
    b = np.array([0.20, 0.22, 0.31, 0.12, 0.41, 0.15])
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    from scipy.stats import t as student

    expected = 2 * student.sf(abs(t), d.size - 1)
    assert paired_pvalue(a, b) == pytest.approx(expected, rel=1e-12)
    assert paired_pvalue(a, a) == 1.0
    with pytest.raises(ValueError, match="shape"):
        paired_pvalue(a, b[:3])


def test_clearly_better_gets_a_star_equal_does_not():
    rng = np.random.default_rng(0)
    base = rng.random(2000)
    better = base + 0.05 + 0.01 * rng.standard_normal(2000)
    assert significant_gain(better, {"sasrec": base, "gru4rec": base - 0.1})
    assert not significant_gain(base + 0.001 * rng.standard_normal(2000), {"sasrec": base})
    # compared with the BEST baseline: beating a weak one is not enough
    assert not significant_gain(better, {"weak": base, "strong": better + 0.05})
    assert not significant_gain(better, {})


def test_per_user_metric_from_ranks():
    ranks = np.array([0, 3, 9, 10, 25])
    assert per_user_metric(ranks, "Recall@10").tolist() == [1, 1, 1, 0, 0]
    assert per_user_metric(ranks, "ndcg@10")[1] == pytest.approx(1 / np.log2(5))
    assert per_user_metric(ranks, "NDCG@20")[4] == 0.0


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
    ndcg_row = next(line for line in tex.splitlines() if "NDCG@10" in line)
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
    assert "Recall@10 std" in (tmp_path / "t.csv").read_text()


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (Debian texlive-latex-recommended)")
def test_generated_latex_compiles(tmp_path):
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   + table_2().to_latex() + "\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_figures_are_written(tmp_path):
    frame = pd.DataFrame({"Recall@10": [0.080, 0.071, 0.074, 0.076], "Recall@10 std": [0.001] * 4,
                          "NDCG@10": [0.037, 0.033, 0.035, 0.036]},
                         index=["IGR-SR", "w/o LID", "concat", "w/o ICR"])
    for p in ablation_figure(frame, tmp_path / "ablation"):
        assert p.stat().st_size > 1000
    grid = pd.DataFrame(np.random.default_rng(0).random((3, 2)) / 10, index=[2, 8, 32], columns=[1, 3])
    paths = sensitivity_figure(grid, tmp_path / "sens")
    assert [p.suffix for p in paths] == [".pdf", ".png"]
