"""Report building blocks: per-user metrics, the star's rule, the comparison table from stored ranks
(stars, daggers, intervals, gains, dropped seeds), figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report import ablation_figure, ablation_plot, paired_pvalue, per_user_metric, sensitivity_figure, significant_gain


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


def test_ablation_bars_start_at_zero_with_their_values_printed():
    """Bars on an axis starting above 0 stretch a 1% gap into a doubled bar: every panel starts
    at 0, has room above the tallest bar and its error bar, and prints each value."""
    import matplotlib.pyplot as plt

    frame = pd.DataFrame({"Recall@10": [0.080, 0.071, 0.074, 0.076], "Recall@10 std": [0.001, 0.004, 0.002, 0.003],
                          "NDCG@10": [0.037, 0.033, 0.035, 0.036]},
                         index=["IGR-SR", "w/o LID", "concat", "w/o ICR"])
    fig = ablation_plot(frame)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["Recall@10", "NDCG@10"]
        for ax, top in zip(fig.axes, (0.076 + 0.003, 0.037)):  # the highest bar + its error bar
            bottom, high = ax.get_ylim()
            assert bottom == 0.0 and high > top
            assert all(p.get_y() == 0.0 for p in ax.patches)  # bars drawn from 0
        assert [t.get_text() for t in fig.axes[1].texts] == ["0.0370", "0.0330", "0.0350", "0.0360"]
    finally:
        plt.close(fig)


def test_captions_state_the_budget_and_the_precision():
    from harness.report import budget_note

    note = budget_note({"epochs": 30, "patience": 10, "precision": "bf16"})
    assert "at most 30 epochs" in note and "early stop after 10" in note and "in bf16 (scores ranked in fp32)" in note
    assert budget_note({}) == ""


class FakeArtifacts:
    """Per-user ranks by artifact id, read back the way optuna's artifact store serves them."""

    def __init__(self):
        self.ranks: dict[str, np.ndarray] = {}

    def open_reader(self, artifact_id: str):
        import io

        buf = io.BytesIO()
        np.savez(buf, test_ranks=self.ranks[artifact_id])
        buf.seek(0)
        return buf


def fake_runs(store: FakeArtifacts, hit_rates: dict[str, float], seeds: dict[str, list[int]], users: int = 3000,
              capped: tuple = ()) -> pd.DataFrame:
    """Finished cells as harness.report.runs_frame makes them from trials: per model and seed, ranks
    with the model's top-10 hit rate; `capped` (model, seed) runs stopped at the epoch cap."""
    from types import SimpleNamespace

    from harness.report import METRICS, runs_frame

    rng = np.random.default_rng(0)
    trials = []
    for model, hit in hit_rates.items():
        for seed in seeds[model]:
            ranks = np.where(rng.random(users) < hit, rng.integers(0, 10, users), rng.integers(10, 1000, users))
            store.ranks[f"{model}-{seed}"] = ranks
            stopped = "max epochs" if (model, seed) in capped else "early stop (no gain for 5 epochs)"
            trials.append(SimpleNamespace(user_attrs={
                "cell_info": {"model": model, "dataset": "toys", "seed": seed, "noise": 0.0, "params": {}},
                "test": {m: float(per_user_metric(ranks, m).mean()) for m in METRICS},
                "artifact_ranks": f"{model}-{seed}", "stopped": stopped}))
    return runs_frame(trials)


def test_star_on_ndcg_only_when_igr_sr_beats_every_baseline(tmp_path):
    from harness.report import comparison_table

    store, seeds = FakeArtifacts(), {m: [2020, 2021, 2022] for m in ("sasrec", "gru4rec", "igr-sr")}
    runs = fake_runs(store, {"sasrec": 0.10, "gru4rec": 0.08, "igr-sr": 0.16}, seeds)
    table = comparison_table(runs, store, "compare", mask_history=False)
    assert table.stars.loc[("toys", "NDCG@10"), "IGR-SR"]
    assert table.stars.to_numpy().sum() == 1  # NDCG@10, the primary metric, only
    assert "NDCG@10 is the primary metric" in table.caption and "Holm" in table.caption
    assert r"$\dagger$" not in table.to_latex()  # no run hit the epoch cap
    table.to_csv(tmp_path / "t.csv")
    csv = pd.read_csv(tmp_path / "t.csv").set_index(["Dataset", "Metric", "Model"])
    for col in ("mean", "std", "ci95_low", "ci95_high", "max_epochs", "star", "n_seeds", "gain_pct", "gain_ci95_low",
                "gain_ci95_high", "p", "p_holm", "p_users", "seeds_ahead"):
        assert col in csv.columns, col
    sasrec = csv.loc[("toys", "NDCG@10", "SASRec")]
    assert sasrec["gain_ci95_low"] < sasrec["gain_pct"] < sasrec["gain_ci95_high"] and sasrec["gain_ci95_low"] > 0
    assert sasrec["p_holm"] >= sasrec["p"] and sasrec["seeds_ahead"] == 3 and sasrec["n_seeds"] == 3
    igr = csv.loc[("toys", "NDCG@10", "IGR-SR")]
    assert igr["ci95_low"] < igr["mean"] < igr["ci95_high"] and np.isnan(igr["gain_pct"])
    assert igr["mean"] == pytest.approx(runs.loc[runs["model"] == "igr-sr", "ndcg@10"].mean())

    tied = fake_runs(store, {"sasrec": 0.16, "gru4rec": 0.08, "igr-sr": 0.16}, seeds)
    assert not comparison_table(tied, store, "compare", mask_history=False).stars.to_numpy().any()


def test_capped_runs_get_a_dagger_and_dropped_seeds_are_named():
    from harness.report import comparison_table

    store = FakeArtifacts()
    seeds = {"sasrec": [2020, 2021], "igr-sr": [2020, 2021, 2022]}
    runs = fake_runs(store, {"sasrec": 0.10, "igr-sr": 0.12}, seeds, capped=(("sasrec", 2021), ("igr-sr", 2022)))
    assert runs["capped"].tolist() == [False, True, False, False, True]
    table = comparison_table(runs, store, "compare", mask_history=False)
    assert table.daggers["SASRec"].all() and not table.daggers["IGR-SR"].any()  # 2022 is not among the seeds used
    ndcg_row = next(line for line in table.to_latex().splitlines() if line.startswith(" & NDCG@10"))
    assert r"$^\dagger$" in ndcg_row.split("&")[2] and "epoch cap" in table.caption
    assert "Means and tests use the 2 seeds every column has; seed 2022 of some columns left out." in table.caption
    igr = runs[(runs["model"] == "igr-sr") & (runs["seed"] < 2022)]
    assert table.mean.loc[("toys", "Recall@10"), "IGR-SR"] == pytest.approx(igr["recall@10"].mean())
    assert table.long()["n_seeds"].eq(2).all()
