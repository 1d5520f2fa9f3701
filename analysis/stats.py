"""The statistics behind every interval the analysis prints (scipy.stats throughout).

- `mean_ci`: mean over seeds with a two-sided t-interval (a description of one arm, never a comparison);
- `paired`: per-seed differences of two arms that share a start (the seed fixes the warm start, the prompt
  order and the first rollout): mean, t-interval on n - 1 degrees of freedom, standardized effect size
  d_z = mean / sd, paired t-test p-value, and the minimum detectable difference;
- `detectable_effect`: the smallest standardized paired effect a two-sided 5% paired t-test detects with 80%
  power at n pairs (noncentral t; the same computation as statsmodels' TTestPower.solve_power, done here with
  scipy to spare the analysis a 5 s import);
- `clopper_pearson`: exact binomial interval for k collapsed of n seeds;
- `sign_flip_test`: the exact paired randomization test behind every claimed difference (see its docstring);
- `tost`: two one-sided t-tests of equivalence within a margin, the only way a null is claimed;
- `holm`: Holm's step-down adjustment of a family of p-values;
- `mcnemar_exact`: exact McNemar test of paired binary outcomes (collapsed or not);
- `seeds_for_power`: prospective design, how many seeds a given difference needs at a given spread.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

LEVEL = 0.95
POWER = 0.8
ALPHA = 1 - LEVEL
RANDOM_SEED = 0  # the sign-flip test's Monte Carlo draws beyond 13 values


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


def sign_flip_test(diffs: np.ndarray, n_resamples: int = 9999, seed: int = RANDOM_SEED) -> tuple[float, float]:
    """(p, smallest attainable p) of the exact paired randomization test of mean(diffs) = 0: under the null the
    two arms of a pair are exchangeable, so each difference's sign is a coin flip (scipy.stats.permutation_test
    with one sample and permutation_type='samples'; exact enumeration up to 13 values, seeded Monte Carlo
    beyond).

    Why this and not the t-test decides a claim: it assumes no normality of 3-20 per-seed values (which no
    one can check), and its floor makes the design's limit explicit: n values of one sign reach p = 2 / 2^n at
    best, so 3 seeds can never show a difference at 5% (p >= 0.25), 10 seeds can (p >= 0.002).
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


def tost(diffs: Sequence[float], margin: float) -> float:
    """p-value of equivalence within +-margin by two one-sided t-tests (the larger of the two one-sided p):
    p < alpha exactly when the (1 - 2 alpha) t-interval lies inside (-margin, margin). NaN for n < 2.
    Differences that are all exactly 0 are equivalent (p = 0): there is no spread to doubt."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan
    if np.all(d == d[0]):
        return 0.0 if abs(d[0]) < margin else 1.0
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(lower, upper))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order; NaN stays NaN and is not
    counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def mcnemar_exact(only_x: int, only_y: int) -> float:
    """Two-sided exact McNemar p from the discordant pairs (X collapsed and Y not; Y and not X): a binomial
    test of only_x out of only_x + only_y against 1/2; 1 when there is no discordant pair."""
    n = int(only_x) + int(only_y)
    return 1.0 if n == 0 else float(stats.binomtest(int(only_x), n, 0.5).pvalue)


def seeds_for_power(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                    limit: int = 10_000) -> float:
    """Smallest number of seeds at which a two-sided paired t-test at level alpha detects a true mean
    difference `difference` with the given power when the per-seed values have spread sd (design information:
    sd from a few seeds is itself uncertain). NaN when sd is 0 or unknown; inf past `limit`."""
    if not (sd > 0 and np.isfinite(sd)) or difference == 0:
        return math.nan
    target = abs(difference) / sd
    if detectable_effect(limit, alpha, power) > target:
        return math.inf
    lo, hi = 2, limit  # detectable_effect falls with n: bisect for the first n that reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if detectable_effect(mid, alpha, power) <= target else (mid + 1, hi)
    return float(lo)
