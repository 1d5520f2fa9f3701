"""The statistics behind every interval the analysis prints (scipy.stats throughout).

- `mean_ci`: mean over seeds with a two-sided t-interval (a description of one arm, never a comparison);
- `paired`: per-seed differences of two arms that share a start (the seed fixes the warm start, the prompt
  order and the first rollout): mean, t-interval on n - 1 degrees of freedom, standardized effect size
  d_z = mean / sd, paired t-test p-value, and the minimum detectable difference;
- `detectable_effect`: the smallest standardized paired effect a two-sided 5% paired t-test detects with 80%
  power at n pairs (noncentral t; the same computation as statsmodels' TTestPower.solve_power, done here with
  scipy to spare the analysis a 5 s import);
- `clopper_pearson`: exact binomial interval for k collapsed of n seeds;
- `sign_flip_test`: the exact paired randomization test that must agree before an aggregate difference is
  claimed (see its docstring);
- `stratified_bootstrap`: rliable's stratified bootstrap (strata = cells, resampling seeds within each cell),
  computed by scipy.stats.bootstrap with one sample per stratum (scipy resamples each sample independently,
  which is exactly stratification), vectorized over resamples, percentile intervals as rliable reports, seeded.
  rliable itself loops over resamples in Python (arch's StratifiedBootstrap), too slow for a regeneration
  that computes dozens of intervals.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

LEVEL = 0.95
POWER = 0.8
ALPHA = 1 - LEVEL
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean_ci(df: pd.DataFrame, by: list[str], value: str, level: float = LEVEL) -> pd.DataFrame:
    """Per group of `by`: n, mean, lo, hi of column `value` (NaN values ignored).

    lo/hi are the t-interval mean ± t_{(1+level)/2, n-1} · s/√n; NaN when n < 2, where no spread is known.
    """
    g = df.groupby(by, sort=True, dropna=False)[value]
    out = g.agg(n="count", mean="mean", sem="sem").reset_index()
    n = out["n"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        t = stats.t.ppf((1 + level) / 2, np.where(n >= 2, n - 1, np.nan))
    half = t * out["sem"].to_numpy(dtype=float)
    out["lo"] = out["mean"] - half
    out["hi"] = out["mean"] + half
    return out.drop(columns="sem")


@functools.cache
def detectable_effect(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Standardized paired effect (mean difference / sd of differences) that a two-sided paired t-test at
    level alpha detects with the given power from n pairs; NaN for n < 2."""
    if n < 2:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(d: float) -> float:
        nc = d * math.sqrt(n)
        # scipy's nct returns NaN for some vanishing tails at df = 1: such a tail contributes nothing
        upper, lower = stats.nct.sf(crit, df, nc), stats.nct.cdf(-crit, df, nc)
        return float(np.nan_to_num(upper, nan=1.0) + np.nan_to_num(lower, nan=0.0)) - power

    upper = 1.0
    while shortfall(upper) < 0:
        upper *= 2
    return float(optimize.brentq(shortfall, 1e-6, upper, xtol=1e-10))


def paired(diffs: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """Statistics of per-seed differences (NaN-free): n, mean_diff, sd, lo, hi, effect (d_z), p, mde.

    mde is the smallest |mean difference| detectable with 80% power (two-sided 5%) given the observed sd:
    a null ("no detectable difference") reads "no difference larger than mde". With identical differences
    (sd = 0) the interval is the point and mde is 0.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    out = {"n": n, "mean_diff": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "effect": math.nan,
           "p": math.nan, "mde": math.nan}
    if n == 0:
        return out
    mean = float(d.mean())
    out["mean_diff"] = mean
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out["sd"] = sd
    if sd == 0:
        out.update(lo=mean, hi=mean, mde=0.0, p=1.0 if mean == 0 else 0.0)
        return out
    half = stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    out.update(lo=mean - half, hi=mean + half, effect=mean / sd,
               p=float(stats.ttest_1samp(d, 0.0).pvalue), mde=detectable_effect(n) * sd)
    return out


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion k/n; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def iqm(*strata: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean of all strata pooled (rliable's IQM: the 25% trimmed mean)."""
    return stats.trim_mean(np.concatenate(strata, axis=axis), 0.25, axis=axis)


def improvement_probability(*strata: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(X > Y) from paired differences: within each stratum the fraction of seeds where X beat Y (a tie
    counts 1/2), averaged over strata (rliable's average over tasks; pairs, not all cross-seed pairs, because
    the seeds share a start)."""
    return np.mean([np.mean(np.where(s > 0, 1.0, np.where(s == 0, 0.5, 0.0)), axis=axis) for s in strata], axis=0)


def sign_flip_test(diffs: np.ndarray, n_resamples: int = 9999, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """(p, smallest attainable p) of the exact paired randomization test of mean(diffs) = 0: under the null the
    two arms of a pair are exchangeable, so each difference's sign is a coin flip (scipy.stats.permutation_test
    with one sample and permutation_type='samples'; exact enumeration up to 2^13 pairs' flips).

    This is what guards the aggregate verdict: the bootstrap only reshuffles the seeds it has, so three
    positive pairs give an interval that excludes 0 while their p here is 0.25 (2 / 2^3) at best. The statistic
    is the mean, not the IQM the verdict reports: any flip of a nonzero difference lowers |mean|, so n pairs of
    one sign reach the floor 2 / 2^n; the IQM trims the smallest values, whose flips then tie the observed
    statistic (6 positive pairs: p = 4/64, never below 5%).
    """
    d = np.asarray(diffs, dtype=float)
    nonzero = int(np.count_nonzero(d))
    floor = min(1.0, 2.0 / 2 ** nonzero) if nonzero else 1.0
    if nonzero < 2:  # one pair: both signs give the same |statistic|, p = 1 (scipy needs two observations)
        return 1.0, floor
    res = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=n_resamples, alternative="two-sided",
                                 rng=np.random.default_rng(seed))
    return float(res.pvalue), floor


def stratified_bootstrap(strata: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                         level: float = LEVEL, n_resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(point, lo, hi): the statistic on the data and its stratified-bootstrap percentile interval."""
    samples = [np.asarray(s, dtype=float) for s in strata]
    point = float(statistic(*samples, axis=-1))
    # A stratum of one seed resamples to itself: hold it fixed (scipy resamples samples of two or more).
    varying = [i for i, s in enumerate(samples) if len(s) > 1 and not np.all(s == s[0])]
    if not varying:
        return point, point, point

    def with_fixed(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        batch = resampled[0].shape[:-1]
        full = [np.broadcast_to(s, (*batch, len(s))) for s in samples]
        for i, r in zip(varying, resampled):
            full[i] = r
        return statistic(*full, axis=axis)

    res = stats.bootstrap(tuple(samples[i] for i in varying), with_fixed, n_resamples=n_resamples,
                          vectorized=True, paired=False, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)
