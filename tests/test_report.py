"""Report building blocks: per-user metrics, paired t-tests and stars, figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report import ablation_figure, paired_pvalue, per_user_metric, sensitivity_figure, significant_gain


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


def test_figures_are_written(tmp_path):
    frame = pd.DataFrame({"Recall@10": [0.080, 0.071, 0.074, 0.076], "Recall@10 std": [0.001] * 4,
                          "NDCG@10": [0.037, 0.033, 0.035, 0.036]},
                         index=["IGR-SR", "w/o LID", "concat", "w/o ICR"])
    for p in ablation_figure(frame, tmp_path / "ablation"):
        assert p.stat().st_size > 1000
    grid = pd.DataFrame(np.random.default_rng(0).random((3, 2)) / 10, index=[2, 8, 32], columns=[1, 3])
    paths = sensitivity_figure(grid, tmp_path / "sens")
    assert [p.suffix for p in paths] == [".pdf", ".png"]


def test_captions_state_the_budget_and_the_precision():
    from harness.report import budget_note

    note = budget_note({"epochs": 30, "patience": 10, "precision": "bf16"})
    assert "at most 30 epochs" in note and "early stop after 10" in note and "in bf16 (scores ranked in fp32)" in note
    assert budget_note({}) == ""
