"""Significance tests, intervals and corrections for the experiment tables, from per-user
metric values of several trained models (seeds) per table cell.

The data. A cell (a model, or a variant, on a dataset) holds S runs that differ only in their
seed, each scored on the same N test users: a seeds x users matrix of per-user values
(NDCG@10 or Recall@10 of each user's held-out item). Two random sources move a cell's mean:
which users the test set happens to hold, and the training randomness a seed fixes
(initialisation, data order). Per model, think of a user's value at seed s as
    x[s, u] = mu + alpha[u] + tau[s] + eps[s, u]
(alpha: how easy the user is for this model; tau: the seed's shift of the whole run; eps:
the seed's effect on this one user). Users are shared by every seed and every model; seeds
are not shared between models: seed s fixes the initialisation and data order of different
networks, so nothing pairs seed s of one model with seed s of another.

What the old test did, and why it was dropped. It concatenated every seed's per-user array
and ran one paired t-test over S x N "users". That counts each user S times and ignores tau
altogether, treating each trained model as fixed, and a test that does so overstates its
confidence (Bouthillier et al., MLSys 2021). The simulation in shared/notes/statistics.md (two
identically distributed models, 19,412 users, 3 seeds) fires it several times as often as its
nominal 1%; tests/test_stats.py runs a smaller one.

What is used instead (`compare`). A t-test on the difference D of the two grand means (over
seeds and users) whose variance holds both sources, the way a linear mixed model with
crossed user and seed effects does:
    Var(D) = s2_a / S_a + s2_b / S_b + max(0, v_d - r_a / S_a - r_b / S_b) / N
- s2: the variance of a model's per-seed means over its seeds, each model's own (training
  stability differs between models). It estimates tau's variance plus eps's share of a seed
  mean; these two terms alone would be Welch's two-sample test on per-seed means;
- v_d: the variance over users of the seed-averaged per-user difference, the user-sampling
  part the paired t-test over users estimates; it also holds eps, which the s2 terms already
  count, so eps's part (r / S, r being the residual mean square of the seeds x users
  two-way layout) is taken out rather than counted twice. That part is estimated from S x N
  values, so it is nearly exact, and its truncation at zero changes little.
Degrees of freedom by Welch-Satterthwaite over the three terms (S_a - 1, S_b - 1, N - 1), with
one guard: in that formula (not in the variance) each seed term counts at least the
within-seed user noise a seed mean must carry (r / N, nearly exact). With 3 seeds s2 has 2
degrees of freedom and often falls far below its expectation by chance; plain Satterthwaite
then reads the seed term as negligible, grants the user term's thousands of degrees of
freedom to a variance that is too small, and the test fires above its nominal rate. With many
users and little seed spread the test is the paired t-test over users (of the seed-averaged
values); with seed spread dominating it is Welch's test on per-seed means, few degrees of
freedom and all. One seed per model leaves tau unestimable: the test and intervals
then fall back to users only, and `Comparison.seed_aware` says so (captions carry it).

Alternatives weighed (shared/notes/statistics.md lists them):
- A two-stage bootstrap (seeds, then users within them): with 3 seeds the seed level has 10
  distinct resamples, whose spread is (S - 1) / S of the seed variance, read off a percentile
  as if normal; resampling users on top counts eps again. Its false-positive rate therefore
  depends on which source dominates, above nominal when seeds do, far below otherwise.
  The closed form above has neither problem, and needs no random numbers, so a table is the
  same every time it is rebuilt.
- A test on per-seed means alone (Welch): holds the rate for these test users, but the same
  users sit in every seed, so it says nothing about user sampling, and with 3 seeds per model
  it has few degrees of freedom. It is the seed term above.
- Wilcoxon or sign tests over users: with thousands of users their false-positive rate
  inflates, while t, bootstrap and randomisation tests stay near nominal (Ihemelandu &
  Ekstrand, SIGIR 2023; Smucker, Allan & Carterette, CIKM 2007). A t statistic it is.
The per-user view averaged over seeds (`paired_pvalue` of the seed-averaged arrays) is kept
as a secondary column, and so is the number of seeds in which the proposed model is ahead.

Effect sizes with intervals (Sakai; Ihemelandu & Ekstrand): each comparison reports the
difference of means and the relative gain 100 * (mean_a / mean_b - 1), both with 95%
intervals (the gain's by the delta method, the baseline's own uncertainty included), and
each cell its mean with a 95% interval from the same two variance terms.

Several baselines: "the proposed model beats every baseline" is claimed when every
difference is positive and every Holm-adjusted p-value is below ALPHA (Holm over the
baselines, Boytsov, Belova & Westfall, SIGIR 2013), on one metric fixed in advance, NDCG@10,
so that the family of tests stays small. The joint claim alone would need no correction (it
fails unless every single test passes); Holm makes each per-baseline claim in the CSV
(p_holm) hold family-wise as well, at a small cost in power. The other metrics' p-values
are descriptive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps

ALPHA = 0.01  # significance level of the tables' star
LEVEL = 0.95  # coverage of every interval
PRIMARY = "ndcg@10"  # the metric the star is about, fixed before any result


@dataclass(frozen=True)
class Estimate:
    """A mean (of a cell, or a difference) with its interval."""

    value: float
    low: float
    high: float
    std_error: float
    df: float
    seed_aware: bool  # False: one seed, so the interval covers user sampling only


@dataclass(frozen=True)
class Comparison:
    """Model a against model b on the same users: D = mean(a) - mean(b), over seeds and users."""

    diff: Estimate
    gain_pct: Estimate  # 100 * (mean(a) / mean(b) - 1), delta-method interval
    pvalue: float  # two-sided, seed-aware (users only when seed_aware is False)
    pvalue_users: float  # secondary: paired t-test over users of the seed-averaged values
    seeds_ahead: int  # seeds i with mean(a[i]) > mean(b[i]) (rows in the caller's seed order)
    n_seeds: int  # seeds compared (rows common to both)

    @property
    def seed_aware(self) -> bool:
        return self.diff.seed_aware


def as_matrix(values: np.ndarray) -> np.ndarray:
    """A seeds x users float matrix (one seed's 1-d array becomes one row)."""
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected seeds x users values with at least 2 users, got shape {x.shape}")
    return x


def _parts(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-user seed averages, the variance of per-seed means over seeds (s2) and the residual
    mean square of the seeds x users layout (r); s2 and r are NaN with one seed."""
    seeds, users = x.shape
    per_user = x.mean(axis=0)
    if seeds < 2:
        return per_user, np.nan, np.nan
    per_seed = x.mean(axis=1)
    resid = x - per_seed[:, None] - per_user[None, :] + x.mean()
    return per_user, float(per_seed.var(ddof=1)), float((resid * resid).sum() / ((seeds - 1) * (users - 1)))


def _satterthwaite(terms: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Variance (sum of the terms) and Welch-Satterthwaite degrees of freedom of a sum of
    independent variance estimates, each given as (value, its degrees of freedom)."""
    var = float(sum(v for v, _ in terms))
    denom = sum(v * v / df for v, df in terms if v > 0)
    return var, (var * var / denom if denom > 0 else np.inf)


def _estimate(value: float, var: float, df: float, seed_aware: bool, level: float) -> Estimate:
    se = float(np.sqrt(max(var, 0.0)))
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se if se > 0 else 0.0
    return Estimate(float(value), float(value) - half, float(value) + half, se, float(df), seed_aware)


def _pvalue(value: float, se: float, df: float) -> float:
    if se <= 0:
        return 1.0 if value == 0 else 0.0
    return float(2 * sps.t.sf(abs(value) / se, df))


def mean_interval(values: np.ndarray, level: float = LEVEL) -> Estimate:
    """A cell's mean over seeds and users with its interval: seed term s2 / S plus the
    user-sampling term (users' variance of their seed-averaged values less the within-user
    seed noise the seed term already holds), Welch-Satterthwaite degrees of freedom with the
    module docstring's guard."""
    x = as_matrix(values)
    seeds, users = x.shape
    per_user, s2, r = _parts(x)
    if seeds < 2:
        var, df = _satterthwaite([(per_user.var(ddof=1) / users, users - 1)])
        return _estimate(x.mean(), var, df, False, level)
    user_term = max(0.0, float(per_user.var(ddof=1)) - r / seeds) / users
    var = s2 / seeds + user_term
    _, df = _satterthwaite([(max(s2, r / users) / seeds, seeds - 1), (user_term, users - 1)])
    return _estimate(x.mean(), var, df, True, level)


def paired_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test p-value of a vs b (same users, same order): the user-level view,
    for one seed or for per-user values averaged over seeds."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    if np.allclose(a, b):
        return 1.0
    d = a - b
    if np.allclose(d, d.flat[0]):  # the same nonzero difference for every user: no spread, t infinite
        return 0.0
    return float(sps.ttest_rel(a, b).pvalue)


def compare(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> Comparison:
    """Model a against model b: seeds x users matrices over the same users (columns in the same
    user order); rows are seeds, paired by position only for `seeds_ahead`. The test and
    intervals are the module docstring's."""
    a, b = as_matrix(a), as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two models were scored on different users: {a.shape[1]} vs {b.shape[1]}")
    users = a.shape[1]
    (ua, s2a, ra), (ub, s2b, rb) = _parts(a), _parts(b)
    sa, sb = a.shape[0], b.shape[0]
    mean_a, mean_b = float(a.mean()), float(b.mean())
    d = ua - ub
    seed_aware = sa >= 2 and sb >= 2
    if seed_aware:
        user_d = max(0.0, float(d.var(ddof=1)) - ra / sa - rb / sb) / users
        var_d = s2a / sa + s2b / sb + user_d
        _, df = _satterthwaite([(max(s2a, ra / users) / sa, sa - 1), (max(s2b, rb / users) / sb, sb - 1),
                                (user_d, users - 1)])
        var_a = s2a / sa + max(0.0, float(ua.var(ddof=1)) - ra / sa) / users
        var_b = s2b / sb + max(0.0, float(ub.var(ddof=1)) - rb / sb) / users
    else:  # tau cannot be estimated: users only, from the seed-averaged values
        var_d, df = _satterthwaite([(float(d.var(ddof=1)) / users, users - 1)])
        var_a, var_b = float(ua.var(ddof=1)) / users, float(ub.var(ddof=1)) / users
    diff = _estimate(mean_a - mean_b, var_d, df, seed_aware, level)
    cov_ab = (var_a + var_b - var_d) / 2  # the users' share both means move with
    if mean_b > 0:
        ratio = mean_a / mean_b
        var_ratio = (var_a - 2 * ratio * cov_ab + ratio * ratio * var_b) / (mean_b * mean_b)
        gain = _estimate(100 * (ratio - 1), 1e4 * max(var_ratio, 0.0), df, seed_aware, level)
    else:
        gain = Estimate(np.nan, np.nan, np.nan, np.nan, df, seed_aware)
    common = min(sa, sb)
    ahead = int((a[:common].mean(axis=1) > b[:common].mean(axis=1)).sum())
    return Comparison(diff=diff, gain_pct=gain, pvalue=_pvalue(diff.value, diff.std_error, df),
                      pvalue_users=paired_pvalue(ua, ub), seeds_ahead=ahead, n_seeds=common)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest p times
    (m - i + 1), made non-decreasing, capped at 1. NaN stays NaN and does not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = order.size
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def beats_all(comparisons: Mapping[str, Comparison], alpha: float = ALPHA) -> bool:
    """True when the proposed model is ahead of every baseline and every Holm-adjusted p-value
    (over the baselines) is below alpha. No baselines: False."""
    if not comparisons:
        return False
    adjusted = holm([c.pvalue for c in comparisons.values()])
    return all(c.diff.value > 0 for c in comparisons.values()) and bool(np.all(adjusted < alpha))


def seed_std(per_seed: Sequence[float]) -> float:
    """Standard deviation over seeds (ddof 1); NaN with one seed."""
    v = np.asarray(per_seed, dtype=float)
    return float(v.std(ddof=1)) if v.size > 1 else np.nan
