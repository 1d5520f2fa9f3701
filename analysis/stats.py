"""Mean over seeds with a two-sided t-interval (scipy.stats); no interval from a single seed."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95


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

