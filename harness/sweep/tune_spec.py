"""A scale's `tune:` stage as data: which knobs each objective tunes over which ranges, at which cells and
seeds, with how many trials, which Optuna sampler and pruner, and the tolerance that defines "near the best".

Checked when the sweep file loads (pydantic here; what needs the scale's objectives and seeds in
harness.sweep.spec). The stage itself runs in harness.sweep.tuning.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from harness.config import ConfigError
from harness.sweep.fields import check_key, replace_axes

# name -> Optuna class; each takes the spec's other keys as keyword arguments (checked by building it)
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler", "gp": "GPSampler",
            "grid": "GridSampler"}  # grid: every combination of the knobs' choices, each once (trials = their number)
GRID_FIELDS = ("objective", "batch_ratio", "iterations", "seed")  # what trials compare or repeat, never tune
PRUNERS = {"median": "MedianPruner", "successive-halving": "SuccessiveHalvingPruner",
           "threshold": "ThresholdPruner", "none": "NopPruner"}


class KnobRange(BaseModel):
    """One tuned knob: a float or integer range (log scale optional), or a list of choices."""

    model_config = ConfigDict(extra="forbid")
    low: float | None = Field(None, description="smallest value (with high)")
    high: float | None = Field(None, description="largest value; must exceed low")
    log: StrictBool = Field(False, description="sample on a log scale (low > 0)")
    integer: StrictBool = Field(False, description="an integer knob")
    choices: list[Any] | None = Field(None, description="the values to choose from, instead of low/high")

    @model_validator(mode="after")
    def _range(self) -> KnobRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("give either choices (a non-empty list) or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"low {self.low} >= high {self.high}; allowed: low < high")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        return self

    def distribution(self) -> Any:
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


class Named(BaseModel):
    """An Optuna sampler or pruner: its name and its keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _build(kind: str, table: dict[str, str], spec: Named, **extra: Any) -> Any:
    import optuna

    module = optuna.samplers if kind == "sampler" else optuna.pruners
    return getattr(module, table[spec.name])(**extra, **spec.kwargs())


def build_sampler(spec: Named, knobs: dict[str, KnobRange] | None = None) -> Any:
    """knobs: the objective's tuned knobs (the grid sampler's search space: every knob's choices)."""
    if spec.name == "grid":
        import optuna

        class Grid(optuna.samplers.GridSampler):
            """Optuna's grid sampler without its `study.stop()` after the last point, which only works inside
            `optimize()`; here the driver asks and counts the trials (at most the grid's size)."""

            def after_trial(self, *args: Any) -> None:
                pass

        return Grid({k: r.choices for k, r in (knobs or {}).items()}, **spec.kwargs())
    return _build("sampler", SAMPLERS, spec)


def build_pruner(spec: Named) -> Any:
    return _build("pruner", PRUNERS, spec)


class TuneSpec(BaseModel):
    """The tuning stage of a scale: every objective tuned with the same budget before the comparison."""

    model_config = ConfigDict(extra="forbid")
    knobs: dict[str, dict[str, KnobRange]] = Field(
        description="objective (or `all`) -> job field (dotted key, e.g. trl.learning_rate) -> its range; "
                    "`all` applies to every objective of the sweep")
    cells: list[list[StrictInt]] | None = Field(
        None, description="[batch_ratio, iterations] cells a trial runs at (default: the hypothesis's "
                          "contrast cells)")
    seeds: list[StrictInt] = Field(
        description="tuning seeds: a trial runs once per cell and seed; none may be a seed of the comparison "
                    "(or of the exploration it confirms)")
    trials: StrictInt | dict[str, StrictInt] = Field(
        description="trials per objective: one number (an equal budget), or objective -> number (refused "
                    "unless `sweep --unequal-budget`)")
    sampler: Named = Field(
        default_factory=lambda: Named(name="tpe", seed=0),
        description=f"Optuna sampler: name ({', '.join(SAMPLERS)}) and its arguments, e.g. seed")
    pruner: Named = Field(
        default_factory=lambda: Named(name="median", n_startup_trials=2),
        description=f"Optuna pruner: name ({', '.join(PRUNERS)}) and its arguments; steps are rollout "
                    "batches (x jobs per trial, + the job's index, when a trial runs several jobs)")
    tolerance: float = Field(
        0.02, gt=0, allow_inf_nan=False,
        description="trials scoring within this of an objective's best count as near it: the report gives "
                    "the range of each knob they span (robustness to the knob)")

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, spec: Named) -> Named:
        return _check_named("sampler", SAMPLERS, spec)

    @field_validator("pruner")
    @classmethod
    def _pruner(cls, spec: Named) -> Named:
        return _check_named("pruner", PRUNERS, spec)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("needs at least one seed, each once")
        return seeds

    @field_validator("cells")
    @classmethod
    def _cells(cls, cells: list[list[int]] | None) -> list[list[int]] | None:
        if cells is not None and (not cells or any(len(c) != 2 or min(c) < 1 for c in cells)):
            raise ValueError("allowed: a non-empty list of [batch_ratio, iterations] pairs of positive integers")
        return cells

    def trials_of(self, objective: str) -> int:
        return self.trials if isinstance(self.trials, int) else self.trials.get(objective, 0)

    def equal_budget(self, objectives: list[str]) -> bool:
        return len({self.trials_of(o) for o in objectives}) == 1

    def knobs_of(self, objective: str) -> dict[str, KnobRange]:
        return {**self.knobs.get("all", {}), **self.knobs.get(objective, {})}


def _check_named(kind: str, table: dict[str, str], spec: Named) -> Named:
    if spec.name not in table:
        raise ValueError(f"unknown {kind} {spec.name!r}; allowed: {', '.join(table)}")
    try:
        (build_sampler if kind == "sampler" else build_pruner)(spec)
    except (TypeError, ValueError, ImportError) as e:
        raise ValueError(f"{kind} {spec.name!r}: {e}") from None
    return spec


# --- checks that need the rest of the sweep file (spec: a harness.sweep.spec.SweepSpec) ------------------
def objectives_of(spec: Any, scale: str) -> list[str]:
    s = spec.scales[scale]
    axes = replace_axes(spec.axes, s.axes)
    return [str(o) for o in axes.get("objective", [s.base.get("objective", spec.base.get("objective"))])]


def check_tune(spec: Any, path: Path, scale: str) -> None:
    """What a tune section needs the rest of the file for: objectives, seeds, cells."""
    tune = spec.scales[scale].tune
    if tune is None:
        return
    where = f"{path}: scales.{scale}.tune"
    objectives = objectives_of(spec, scale)
    for owner, knobs in tune.knobs.items():
        if owner != "all" and owner not in objectives:
            raise ConfigError(f"{where}.knobs.{owner}: not an objective of this scale; allowed: all, "
                              f"{', '.join(objectives)}")
        for key in knobs:
            _check_knob(f"{where}.knobs.{owner}.{key}", key, objectives if owner == "all" else [owner])
    if not any(tune.knobs_of(o) for o in objectives):
        raise ConfigError(f"{where}.knobs: no knob to tune; allowed: objective (or all) -> field -> range")
    if isinstance(tune.trials, dict):
        unknown = set(tune.trials) - set(objectives)
        missing = [o for o in objectives if o not in tune.trials]
        if unknown or missing:
            raise ConfigError(f"{where}.trials: needs exactly the objectives {', '.join(objectives)} (unknown: "
                              f"{', '.join(sorted(unknown)) or 'none'}; missing: {', '.join(missing) or 'none'})")
    if any(tune.trials_of(o) < 1 for o in objectives):
        raise ConfigError(f"{where}.trials: allowed: 1 or more trials per objective")
    if tune.sampler.name == "grid":
        for o in objectives:
            knobs = tune.knobs_of(o)
            ranged = [k for k, r in knobs.items() if r.choices is None]
            if ranged:
                raise ConfigError(f"{where}.knobs: the grid sampler needs choices for every knob; {o}'s "
                                  f"{', '.join(ranged)} has a range")
            points = math.prod(len(r.choices or []) for r in knobs.values())
            if tune.trials_of(o) > points:
                raise ConfigError(f"{where}.trials: {tune.trials_of(o)} trials of {o} on a grid of {points} "
                                  f"points would repeat points; allowed: at most {points}")
    compared = spec.seeds_of(scale) | (spec.seeds_of(spec.scales[scale].confirms)
                                       if spec.scales[scale].confirms else set())
    overlap = sorted(set(tune.seeds) & compared)
    if overlap:
        raise ConfigError(f"{where}.seeds: {overlap} also seed the comparison (or the exploration it "
                          f"confirms); allowed: seeds not in {sorted(compared)}")
    tune_cells(spec, path, scale)


def _check_knob(where: str, key: str, objectives: list[str]) -> None:
    if key.split("+")[0] in GRID_FIELDS or "+" in key:
        raise ConfigError(f"{where}: {key} is what the study compares or repeats, not a knob; allowed: one "
                          "job field other than " + ", ".join(GRID_FIELDS))
    check_key(where, key, axis=True)
    top, _, knob = key.partition(".")
    from harness.objectives import get_objective
    from harness.objectives.registry import OBJECTIVE_KNOBS

    if top == "trl" and knob in OBJECTIVE_KNOBS:
        for name in objectives:
            used = get_objective(name).knobs
            if knob not in used:
                raise ConfigError(f"{where}: not used by objective {name!r}; its knobs: "
                                  f"{', '.join(f'trl.{k}' for k in used) or 'none'}")


def tune_cells(spec: Any, path: Path, scale: str) -> list[list[int]]:
    """The cells a trial runs at: the tune section's, else the hypothesis's contrast cells."""
    s = spec.scales[scale]
    assert s.tune is not None
    if s.tune.cells is not None:
        return [list(c) for c in s.tune.cells]
    cells = (s.hypothesis or spec.hypothesis).cells
    if isinstance(cells, str):
        raise ConfigError(f"{path}: scales.{scale}.tune.cells: required when the hypothesis's cells are "
                          f"{cells!r}; allowed: a list of [batch_ratio, iterations]")
    return [list(c) for c in cells]
