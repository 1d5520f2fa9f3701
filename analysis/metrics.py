"""The metric keys the analysis reads (defined in harness.contract), with labels and file names."""
from __future__ import annotations

import dataclasses
from typing import Literal

from harness.contract import (
    CLIP_RATIO,
    COMPLETION_LENGTH,
    ENTROPY,
    GRAD_CLIPPED,
    GRAD_NORM,
    LOSS,
    RATIO_ABS_DEV,
    RATIO_MEASURED,
    REF_KL,
    ROLLOUT_BATCH,
    ROLLOUT_KL,
    STEPS_ON_BATCH,
    TRAIN_REWARD,
    VAL_REWARD,
)


@dataclasses.dataclass(frozen=True)
class CurveMetric:
    key: str  # MLflow metric key
    label: str  # y-axis label and figure title
    slug: str  # file name stem under figures/
    yscale: Literal["linear", "log"] = "linear"  # log where a blow-up would flatten everything else


CURVES: tuple[CurveMetric, ...] = (
    CurveMetric(TRAIN_REWARD, "train reward", "train_reward"),
    CurveMetric(VAL_REWARD, "validation reward (greedy)", "val_reward"),
    CurveMetric(CLIP_RATIO, "clip ratio (region mean)", "clip_ratio"),
    CurveMetric(ROLLOUT_KL, "KL(rollout || policy)", "rollout_kl"),
    CurveMetric(REF_KL, "KL to reference", "ref_kl"),
    CurveMetric(ENTROPY, "entropy (nats)", "entropy"),
    CurveMetric(RATIO_ABS_DEV, "mean |r - 1|", "ratio_abs_dev"),
    CurveMetric(COMPLETION_LENGTH, "completion length (tokens)", "completion_length"),
    CurveMetric(GRAD_NORM, "grad norm (before clipping)", "grad_norm", yscale="log"),
)
CURVES_BY_KEY = {c.key: c for c in CURVES}

# Read by the tables (beyond val/reward) and by the collapse rules.
TABLE_KEYS: tuple[str, ...] = (VAL_REWARD, ROLLOUT_KL, CLIP_RATIO, GRAD_CLIPPED, STEPS_ON_BATCH)
# Read when logged (runs of older harness versions lack them; analysis.summary says what it does instead).
OPTIONAL_TABLE_KEYS: tuple[str, ...] = (RATIO_ABS_DEV, RATIO_MEASURED, ROLLOUT_BATCH)
COLLAPSE_KEYS: tuple[str, ...] = (VAL_REWARD, ENTROPY, LOSS)

# Everything the figures, tables and report need: what the loader fetches and caches.
ALL_KEYS: tuple[str, ...] = tuple(dict.fromkeys([c.key for c in CURVES] + list(TABLE_KEYS) + list(OPTIONAL_TABLE_KEYS)
                                                + list(COLLAPSE_KEYS)))
# What a study must have logged (in at least one run) to be analysed at all: every other diagnostic is "n/a"
# where no run logged it (no clipping with max_grad_norm=0, no KL with beta=0, no ratio on-policy), never a
# refusal.
REQUIRED: tuple[str, ...] = (VAL_REWARD,)
