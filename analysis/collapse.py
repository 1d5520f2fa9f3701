"""Collapse rules: when a run is counted as collapsed, why, and from which step.

A run is collapsed when any enabled rule fires; its collapse step is the earliest step at which one fires.

- validation: `val/reward` falls more than `val_drop` below its running peak P (v < (1 - val_drop) P) on two
  consecutive evaluations, and the final value does not come back to `val_recover` x P. A dip that recovers is
  noise, not collapse; a fall seen only at the last evaluation cannot be confirmed and is flagged `censored`
  (at the budget's end), not counted as a collapse.
- entropy collapse: entropy below `entropy_floor` nats (the policy became nearly deterministic);
- entropy explosion: entropy above `entropy_ceiling` x its value over the first rollout batch (the policy went
  towards uniform); entropy is judged per rollout batch (the mean over the batch's optimizer steps), and a
  condition must hold for `entropy_patience` consecutive rollout batches, so one noisy batch does not count
  and the rule means the same at 1 and at 64 optimizer steps per batch; its step is the first step of the
  first batch of the streak;
- non-finite: a NaN or ±Inf `loss` or `grad_norm` (what the harness's divergence guard watches);
- diverged: the harness stopped the run (harness.status == diverged), at the step in its harness.diverged_at
  tag, else at its last logged step.
A rule whose metric a run did not log does not fire for that run.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from analysis.metrics import ENTROPY, GRAD_NORM, LOSS, VAL_REWARD


class CollapseRules(BaseModel):
    """Thresholds of the collapse rules (see the module docstring); defaults are the study's definition."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    val_drop: float = Field(0.5, gt=0, lt=1, description="val reward below (1 - val_drop) x its running peak "
                            "starts a collapse")
    val_recover: float = Field(0.8, gt=0, le=1, description="... unless the final val reward is at least "
                               "val_recover x that peak")
    entropy_floor: float = Field(0.05, ge=0, description="entropy (nats) below this is entropy collapse")
    entropy_ceiling: float = Field(2.0, gt=1, description="entropy above this multiple of its first logged value "
                                   "is entropy explosion")
    entropy_patience: int = Field(3, ge=1, description="consecutive rollout batches an entropy condition "
                                  "(on the batch's mean entropy) must hold")
    nonfinite: bool = Field(True, description="a NaN or Inf loss or grad_norm is collapse")
    diverged_status: bool = Field(True, description="harness.status == diverged is collapse")


@dataclasses.dataclass(frozen=True)
class Verdict:
    collapsed: bool
    reason: str  # rules that fired, earliest first ("" when not collapsed)
    step: float  # optimizer step of the earliest firing rule (NaN when not collapsed)
    rollout_batch: float  # the same as rollout batches completed
    censored: bool = False  # only the validation rule's last evaluation fell: unconfirmed, not counted


COLUMNS = ["run_id", "collapsed", "reason", "step", "rollout_batch", "censored"]


def val_collapse_step(steps: np.ndarray, val: np.ndarray, rules: CollapseRules) -> tuple[int | None, bool]:
    """(step, censored): the first of two consecutive evaluations with val < (1 - drop) x running peak while
    the final value stays < recover x that peak; (last step, True) when only the last evaluation falls so."""
    if len(val) == 0:
        return None, False
    peak = np.maximum.accumulate(val)
    # peak only grows, so once the final value is below recover x peak it stays so
    hit = (val < (1 - rules.val_drop) * peak) & (val[-1] < rules.val_recover * peak)
    twice = np.flatnonzero(hit[:-1] & hit[1:])
    if len(twice):
        return int(steps[twice[0]]), False
    return (int(steps[-1]), True) if hit[-1] else (None, False)


def first_streak(steps: np.ndarray, cond: np.ndarray, length: int) -> int | None:
    """First step of the first run of `length` consecutive True values in cond."""
    run = 0
    for i, c in enumerate(cond):
        run = run + 1 if c else 0
        if run == length:
            return int(steps[i - length + 1])
    return None


def judge_run(curves: dict[str, pd.DataFrame], status: str, steps_per_batch: int, rules: CollapseRules,
              diverged_at: int | None = None) -> Verdict:
    """Verdict of one run; curves maps metric key -> frame with columns step, value sorted by step."""
    fired: list[tuple[int, str]] = []

    def arrays(key: str) -> tuple[np.ndarray, np.ndarray]:
        df = curves.get(key)
        if df is None or df.empty:
            return np.array([], dtype=int), np.array([], dtype=float)
        return df["step"].to_numpy(), df["value"].to_numpy(dtype=float)

    steps, val = arrays(VAL_REWARD)
    ok = np.isfinite(val)  # a NaN val reward is a broken eval, not a value; the loss rule catches NaN training
    s, censored = val_collapse_step(steps[ok], val[ok], rules)
    val_rule = f"val reward fell >{rules.val_drop:.0%} below peak, not back to {rules.val_recover:.0%}"
    if s is not None and not censored:
        fired.append((s, val_rule))

    steps, ent = arrays(ENTROPY)
    ok = np.isfinite(ent)
    if ok.any():
        by_batch = pd.Series(ent[ok]).groupby(np.ceil(steps[ok] / steps_per_batch).astype(int)).mean()
        first_step = (by_batch.index.to_numpy() - 1) * steps_per_batch + 1
        batch_ent = by_batch.to_numpy()
        s = first_streak(first_step, batch_ent < rules.entropy_floor, rules.entropy_patience)
        if s is not None:
            fired.append((s, f"entropy < {rules.entropy_floor:g} nats"))
        s = first_streak(first_step, batch_ent > rules.entropy_ceiling * batch_ent[0], rules.entropy_patience)
        if s is not None:
            fired.append((s, f"entropy > {rules.entropy_ceiling:g}x initial"))

    for key in (LOSS, GRAD_NORM) if rules.nonfinite else ():
        steps, values = arrays(key)
        bad = ~np.isfinite(values)
        if bad.any():
            fired.append((int(steps[np.argmax(bad)]), f"non-finite {key}"))

    if rules.diverged_status and status == "diverged":
        if diverged_at is None:
            diverged_at = max((int(df["step"].max()) for df in curves.values() if not df.empty), default=0)
        fired.append((int(diverged_at), "diverged (the harness stopped the run)"))

    if not fired:
        if s is not None:  # censored: said, with its step, but not a collapse
            return Verdict(False, f"{val_rule} at the last evaluation only (censored)", float(s),
                           s / steps_per_batch, censored=True)
        return Verdict(False, "", np.nan, np.nan)
    fired.sort(key=lambda f: f[0])
    step = fired[0][0]
    return Verdict(True, "; ".join(dict.fromkeys(r for _, r in fired)), float(step), step / steps_per_batch)


def detect_collapse(long: pd.DataFrame, runs: pd.DataFrame, rules: CollapseRules | None = None) -> pd.DataFrame:
    """One row per run of `runs`: run_id, collapsed, reason, step, rollout_batch (of the earliest rule)."""
    rules = rules or CollapseRules()
    by_run = {run_id: {key: g[["step", "value"]].sort_values("step") for key, g in df.groupby("metric")}
              for run_id, df in long.groupby("run_id")}
    rows = []
    for run in runs.itertuples(index=False):
        diverged_at = None if pd.isna(run.diverged_at) else int(run.diverged_at)
        v = judge_run(by_run.get(run.run_id, {}), run.status, run.steps_per_rollout_batch, rules, diverged_at)
        rows.append((run.run_id, v.collapsed, v.reason, v.step, v.rollout_batch, v.censored))
    return pd.DataFrame(rows, columns=COLUMNS)
