"""The stages of a tuned scale (one with `tune:`): which cells each runs and what is refused.

- `tune`: every objective's knobs tuned with the same number of Optuna trials; a trial runs one job per tuning
  cell and tuning seed (its template cells, below) with the trial's sampled knobs. It runs as the scale
  `<scale>/tune` (its own ledger, folder and MLflow experiment), driven by harness.sweep.tuning.
- `compare`: the scale's grid and seeds with each objective at its best tuned setting, analysed as any study.

A scale without `tune:` has one stage, `grid`. Everything here is checked before anything is written; each
problem is one ConfigError naming the field and what is allowed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.config import ConfigError
from harness.sweep.spec import Plan, Stage, SweepSpec, make_plan, scale_spec
from harness.sweep.tune_spec import TuneSpec, tune_cells

STAGES = ("auto", "grid", "tune", "compare")


def pick_stage(spec: SweepSpec, path: Path, scale: str, stage: str) -> list[str]:
    """The stages `--stage` runs, in order: auto is tune then compare on a tuned scale, else grid."""
    tuned = scale_spec(spec, path, scale).tune is not None
    allowed = ("auto", "tune", "compare") if tuned else ("auto", "grid")
    if stage not in allowed:
        raise ConfigError(f"--stage {stage}: scale {scale!r} {'has a' if tuned else 'has no'} tune: section; "
                          f"allowed: {', '.join(allowed)}")
    if stage == "auto":
        return ["tune", "compare"] if tuned else ["grid"]
    return [stage]


def tune_of(plan: Plan) -> TuneSpec:
    tune = plan.spec.scales[plan.base_scale].tune
    assert tune is not None
    return tune


def tune_plan(spec: SweepSpec, path: Path, scale: str, overrides: Sequence[str] = ()) -> Plan:
    """The tuning stage's template cells: every objective x tuning cell x tuning seed, knobs unsampled."""
    tune = spec.scales[scale].tune
    assert tune is not None
    return make_plan(spec, path, scale, overrides, Stage("tune", cells=tune_cells(spec, path, scale),
                                                         seeds=list(tune.seeds)))


def compare_plan(spec: SweepSpec, path: Path, scale: str, tuned: dict[str, dict[str, Any]],
                 overrides: Sequence[str] = ()) -> Plan:
    """The scale's grid with each objective's tuned knobs."""
    return make_plan(spec, path, scale, overrides, Stage("compare", per_objective=tuned))


def check_budget(plan: Plan, unequal_ok: bool) -> None:
    """Every objective gets the same number of trials unless `--unequal-budget`."""
    tune = tune_of(plan)
    objectives = sorted({c.config.objective for c in plan.cells})
    if not tune.equal_budget(objectives) and not unequal_ok:
        counts = ", ".join(f"{o} {tune.trials_of(o)}" for o in objectives)
        raise ConfigError(f"{plan.spec_path}: scales.{plan.base_scale}.tune.trials: unequal budgets ({counts}) "
                          "compare a better-tuned objective with a worse-tuned one; allowed: one number, or "
                          "`sweep --unequal-budget` to run them anyway (the report says so)")
