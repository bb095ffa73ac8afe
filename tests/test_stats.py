"""harness.stats: the seed-aware test holds its false-positive rate where the old pooled
t-test does not (a simulation of identically distributed models), and its parts (intervals,
Holm, the star's rule) are right on cases worked by hand. Seeded; no timing."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from harness.stats import Comparison, Estimate, beats_all, compare, holm, mean_interval, paired_pvalue


def null_pairs(rng: np.random.Generator, draws: int, users: int, seeds: int, seed_sd: float,
               model_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """`draws` pairs of identically distributed models, each draws x seeds x users NDCG@10-like
    values: a user hits with probability sigmoid(user's ease + the model's own view of the user +
    the seed's shift), and a hit is worth 1 / log2(rank + 2) for a rank in 0..9. The seed shift
    is what training randomness does to a whole run."""
    ease = rng.normal(-4.0, 3.0, (draws, 1, users))

    def model() -> np.ndarray:
        logit = ease + rng.normal(0, model_sd, (draws, 1, users)) + rng.normal(0, seed_sd, (draws, seeds, 1))
        hit = rng.random((draws, seeds, users)) < 1 / (1 + np.exp(-logit))
        return hit / np.log2(rng.integers(0, 10, (draws, seeds, users)) + 2)

    return model(), model()


def false_positive_rates(seed_sd: float, model_sd: float, draws: int = 2000, users: int = 3000,
                         chunk: int = 250) -> dict[str, np.ndarray]:
    """p-values of the new test and of the old one (every seed's users concatenated, one paired
    t-test) over `draws` null pairs with 3 seeds each."""
    rng = np.random.default_rng(2024)
    new, old = [], []
    for _ in range(draws // chunk):
        a, b = null_pairs(rng, chunk, users, 3, seed_sd, model_sd)
        for x, y in zip(a, b):
            new.append(compare(x, y).pvalue)
            old.append(paired_pvalue(x.ravel(), y.ravel()))
    return {"new": np.array(new), "old": np.array(old)}


@pytest.mark.parametrize("seed_sd, model_sd", [(0.08, 0.0),  # seeds dominate (the simulation)
                                               (0.06, 1.0)])  # user sampling and seeds both matter
def test_seed_aware_test_holds_its_rate_where_the_pooled_t_test_does_not(seed_sd, model_sd):
    """2,000 null pairs: the binomial standard error of a rate is 0.22 points at 1% and 0.49
    at 5%, so the bounds below are about 3 standard errors above nominal at 5%, and 2x nominal at
    1%, where Satterthwaite's degrees of freedom err a little when the seed variance is
    underestimated by chance (harness/stats.py)."""
    p = false_positive_rates(seed_sd, model_sd)
    assert np.mean(p["new"] < 0.05) <= 0.065 and np.mean(p["new"] < 0.01) <= 0.02
    assert np.mean(p["old"] < 0.05) >= 0.09 and np.mean(p["old"] < 0.01) >= 0.025


def test_one_seed_is_the_paired_t_test_over_users_and_says_so():
    rng = np.random.default_rng(0)
    a, b = rng.random(500), rng.random(500)
    c = compare(a, b)
    assert c.pvalue == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
    assert c.pvalue == pytest.approx(c.pvalue_users, rel=1e-9)
    assert not c.seed_aware and c.n_seeds == 1
    half = sps.t.ppf(0.975, 499) * np.std(a - b, ddof=1) / np.sqrt(500)
    assert (c.diff.low, c.diff.high) == pytest.approx((np.mean(a - b) - half, np.mean(a - b) + half), rel=1e-9)


def test_with_no_user_spread_it_is_welchs_test_on_per_seed_means():
    """Every user of a seed alike: only the per-seed means vary, and the test is Welch's."""
    seed_means_a, seed_means_b = np.array([0.050, 0.053, 0.049]), np.array([0.046, 0.047, 0.045])
    a, b = np.repeat(seed_means_a[:, None], 200, axis=1), np.repeat(seed_means_b[:, None], 200, axis=1)
    c = compare(a, b)
    welch = sps.ttest_ind(seed_means_a, seed_means_b, equal_var=False)
    assert c.pvalue == pytest.approx(welch.pvalue, rel=1e-9)
    assert c.diff.df == pytest.approx(welch.df, rel=1e-9)
    assert c.seed_aware and c.seeds_ahead == 3 and c.n_seeds == 3


def test_comparison_is_antisymmetric_and_the_gain_is_relative_to_the_second():
    rng = np.random.default_rng(1)
    a = (rng.random((3, 4000)) < 0.10) + 0.002 * rng.standard_normal((3, 1))
    b = (rng.random((3, 4000)) < 0.08) + 0.002 * rng.standard_normal((3, 1))
    ab, ba = compare(a, b), compare(b, a)
    assert ab.pvalue == pytest.approx(ba.pvalue) and ab.diff.value == pytest.approx(-ba.diff.value)
    assert ab.gain_pct.value == pytest.approx(100 * (a.mean() / b.mean() - 1))
    assert ab.gain_pct.low < ab.gain_pct.value < ab.gain_pct.high
    assert ab.diff.low < ab.diff.value < ab.diff.high
    assert compare(a, b) == ab  # no resampling: the same numbers every time
    with pytest.raises(ValueError, match="different users"):
        compare(a, b[:, :100])


def test_mean_interval_covers_the_true_mean_at_its_level():
    """x[s, u] = mu + user + seed + noise with known mu: 95% intervals cover it about 95% of
    the time, with user sampling and seeds both random."""
    rng = np.random.default_rng(3)
    draws, seeds, users, mu = 600, 3, 1000, 0.05
    x = (mu + 0.05 * rng.standard_normal((draws, 1, users)) + 0.004 * rng.standard_normal((draws, seeds, 1))
         + 0.1 * rng.standard_normal((draws, seeds, users)))
    covered = np.mean([(e := mean_interval(v)).low <= mu <= e.high for v in x])
    assert 0.92 <= covered <= 0.985
    one = mean_interval(x[0, 0])
    assert not one.seed_aware and one.df == pytest.approx(users - 1)


def test_holm_adjusts_in_input_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.04, 0.03]) == pytest.approx([0.06, 0.06])  # made non-decreasing in the sorted order
    assert holm([0.3, 0.02]) == pytest.approx([0.3, 0.04])
    assert holm([0.6, 0.7, 0.8]).max() <= 1.0
    out = holm([0.02, np.nan, 0.01])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])  # NaN does not count in m
    assert holm([]).size == 0


def _comparison(diff: float, p: float) -> Comparison:
    est = Estimate(diff, diff - 1, diff + 1, 0.5, 10.0, True)
    return Comparison(diff=est, gain_pct=est, pvalue=p, pvalue_users=p, seeds_ahead=3, n_seeds=3)


def test_the_star_needs_every_baseline_beaten_after_holm():
    assert beats_all({"a": _comparison(0.01, 0.001), "b": _comparison(0.02, 0.004)})  # 0.002, 0.004
    assert not beats_all({"a": _comparison(0.01, 0.006), "b": _comparison(0.02, 0.009)})  # each < 0.01, Holm not
    assert not beats_all({"a": _comparison(0.01, 0.001), "b": _comparison(-0.02, 0.001)})  # behind one
    assert not beats_all({})
