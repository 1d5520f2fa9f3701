"""Sweep spec: which job configs (cells) a sweep runs, at which scale.

A spec is a YAML file (see sweeps/grpo-vs-cfpo.yaml): a base job config, axes (any job field, dotted keys for
nested ones), replicate seeds, and its scales, a mapping of name to settings: the job config a scale starts
from (`extends`), where its jobs run (`device`), its time limits and reference costs, its overrides of base,
axes and seeds, and how many GPUs one job gets (`gpus_per_job`, `deepspeed`: how the job is launched, not what
it is). A new scale is one more block under `scales:`. A cell is one point of (axes x seeds) resolved into a
validated `JobConfig`; its identity is `config_hash` of that config, so a cell keeps its identity (and its
ledger entry) across spec edits that do not change what it computes.

A cell's settings, lowest first: the sweep's `extends` job config, the scale's, the sweep's base, the scale's
base, `--set`, the cell's axis values. `extends` paths are relative to the sweep file's folder.

Which fields a file may set, and how, is harness.sweep.fields; a scale's own settings, harness.sweep.scales.
Everything is checked here, before a sweep writes anything: each problem is one `ConfigError` naming the spec
file and the field.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from harness import contract
from harness.config import (
    ConfigError,
    JobConfig,
    build_config,
    config_hash,
    deep_merge,
    parse_value,
    read_mapping,
)
from harness.hypothesis import Hypothesis
from harness.sweep.cost import cell_cost
from harness.sweep.fields import (
    SWEEP_MANAGED,
    check_axis,
    check_key,
    check_section,
    check_values,
    grid_point,
    leaf_keys,
    nest,
    replace_axes,
)
from harness.sweep.scales import CPU_DEFAULTS, DEFAULT_DEVICE, ScaleSpec
from harness.sweep.tune_spec import check_tune
from harness.trl_args import shape_of

# A study or scale name: a folder name and part of an MLflow experiment name.
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SweepSpec(BaseModel):
    """A sweep file: a base job, the axes of the grid, replicate seeds and the scales."""

    model_config = ConfigDict(extra="forbid")
    study: str = Field(
        pattern=NAME, description="study name: results/<study>/<scale>/ and MLflow experiment "
                                  "<study>/<scale>")
    description: str = Field(
        "", description="what the sweep asks; logged on the sweep's parent MLflow run")
    extends: str | None = Field(
        None, description="job config file (relative to the sweep file's folder) every scale starts from; "
                          "its seed, output_dir, experiment and axis fields are ignored")
    base: dict[str, Any] = Field(
        default_factory=dict, description="job fields shared by every cell (any JobConfig field; nested or "
                                          "dotted keys)")
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="job field (dotted key) -> values; the grid is their product; "
                                          "fields joined by '+' move together, e.g. batch_ratio+iterations: "
                                          "[[1, 1], [4, 4], [8, 8]] (a reuse ladder)")
    seeds: list[StrictInt] = Field(
        default_factory=lambda: [0], description="replicate seeds; each cell runs once per seed")
    scales: dict[str, ScaleSpec] = Field(
        description="scale name -> its settings and overrides of base, axes and seeds; `--scale auto` runs "
                    "the first whose device is here")
    hypothesis: Hypothesis = Field(
        default_factory=Hypothesis, description="the primary question, declared before the runs: what the "
                                                "analysis tests and corrects for (harness/hypothesis.py)")
    learning_rate_from: str = Field(
        "", description="where the learning rate came from (e.g. an on-policy calibration of one "
                        "objective); the report's limitations quote it")

    @field_validator("scales")
    @classmethod
    def _scale_names(cls, scales: dict[str, ScaleSpec]) -> dict[str, ScaleSpec]:
        if not scales:
            raise ValueError("needs at least one scale")
        for name in scales:
            if name == "auto" or not re.match(NAME, name):
                raise ValueError(f"scale name {name!r}: allowed: letters, digits and '_.-' (not first), "
                                 "other than 'auto' (`--scale auto` picks a scale)")
        return scales

    @model_validator(mode="after")
    def _confirmations_use_fresh_seeds(self) -> SweepSpec:
        for name, scale in self.scales.items():
            if scale.confirms is None:
                continue
            if scale.confirms == name or scale.confirms not in self.scales:
                raise ValueError(f"scales.{name}.confirms {scale.confirms!r}: allowed: another scale of this "
                                 f"file ({', '.join(n for n in self.scales if n != name)})")
            overlap = self.seeds_of(name) & self.seeds_of(scale.confirms)
            if overlap:
                raise ValueError(f"scales.{name}.seeds: {sorted(overlap)} also seed the exploration "
                                 f"{scale.confirms!r}; a confirmation needs fresh seeds; allowed: seeds not in "
                                 f"{sorted(self.seeds_of(scale.confirms))}")
        return self

    def seeds_of(self, scale: str) -> set[int]:
        seeds = self.scales[scale].seeds
        return set(seeds if seeds is not None else self.seeds)

    @model_validator(mode="after")
    def _baseline_is_an_objective(self) -> SweepSpec:
        objectives = self.axes.get("objective", [self.base.get("objective")])
        declared = [("hypothesis", self.hypothesis)] + [(f"scales.{n}.hypothesis", s.hypothesis)
                                                       for n, s in self.scales.items() if s.hypothesis]
        for where, hypothesis in declared:
            if hypothesis.baseline is not None and hypothesis.baseline not in objectives:
                raise ValueError(f"{where}.baseline {hypothesis.baseline!r} is not an objective of this sweep; "
                                 f"allowed: {', '.join(map(str, objectives))}")
        return self


@dataclasses.dataclass(frozen=True)
class Cell:
    """One job of the grid: its axis values (seed included), its resolved config and its identity."""

    hash: str
    axes: dict[str, Any]
    config: JobConfig

    @property
    def cost(self) -> float:
        """Relative run time, for the queue's order and the ETA (harness.sweep.cost.cell_cost)."""
        return cell_cost(self.config.rollout_batches, self.config.batch_ratio, self.config.iterations)

    def job_fields(self) -> dict[str, Any]:
        """The config as stored in the ledger: everything but the per-machine output_dir and experiment."""
        return self.config.model_dump(mode="json", exclude={"output_dir", "experiment"})

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.axes.items())


@dataclasses.dataclass(frozen=True)
class Stage:
    """How a stage of a tuned scale changes its grid (harness.sweep.stages): `tune` runs the trials' template
    cells (the tuning cells and seeds, ledger `<scale>/tune`); `compare` runs the grid with each objective's
    tuned knobs."""

    name: str  # tune | compare
    cells: list[list[int]] | None = None  # [batch_ratio, iterations] pairs replacing the scale's
    seeds: list[int] | None = None
    per_objective: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # dotted key -> value


@dataclasses.dataclass(frozen=True)
class Plan:
    """A spec resolved at one scale: what a sweep invocation enqueues."""

    spec_path: Path
    spec: SweepSpec
    scale: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    seeds: list[int]
    cells: list[Cell]
    gpus_per_job: int = 1      # the scale's; not part of a cell's identity (see docs/SCALE_OUT.md)
    deepspeed: str = "none"
    cell_timeout_s: float = CPU_DEFAULTS.cell_timeout_min * 60  # the scale's limits (harness.sweep.watchdog)
    stall_timeout_s: float = CPU_DEFAULTS.stall_timeout_min * 60
    device: str = DEFAULT_DEVICE  # the scale's: cuda jobs need GPUs wherever a worker runs
    reference_s: tuple[float, float] | None = CPU_DEFAULTS.reference_s  # the scale's (harness.sweep.cost)
    confirms: str | None = None  # the exploratory scale this one confirms
    stage: str = "grid"  # grid (a scale without tune:), tune or compare
    tuned: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # compare: objective -> knobs

    @property
    def study(self) -> str:
        return self.spec.study

    @property
    def experiment(self) -> str:
        return contract.experiment_name(self.spec.study, self.scale)

    @property
    def hypothesis(self) -> Hypothesis:
        """The question this scale's runs answer: its own, else the sweep's."""
        return self.spec.scales[self.base_scale].hypothesis or self.spec.hypothesis

    @property
    def base_scale(self) -> str:
        """The sweep file's scale (a tuning stage runs as `<scale>/tune`)."""
        return contract.split_stage(self.scale)[0]

    def ledger_scale(self) -> dict[str, Any]:
        """The scale as its ledger records it (harness.sweep.ledger.SCALE), for workers that have no spec."""
        return {"name": self.scale, "device": self.device,
                "reference_s": list(self.reference_s) if self.reference_s is not None else None}


def _on_policy(raw_cfg: dict[str, Any]) -> bool:
    return contract.on_policy(int(raw_cfg.get("batch_ratio", 1)), int(raw_cfg.get("iterations", 1)))


def spec_path(name: str) -> Path:
    """NAME -> sweeps/NAME.yaml when NAME is not itself a file."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (Path("sweeps") / f"{name}.yaml",
                      Path(__file__).resolve().parents[2] / "sweeps" / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: no such sweep (give sweeps/NAME.yaml's NAME or a path to a spec file)")


def load_spec(name: str) -> tuple[SweepSpec, Path]:
    path = spec_path(name)
    raw = read_mapping(path, str(path), "study, base, axes, seeds, scales")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        extra = err["type"] == "extra_forbidden"
        msg = "unknown field" if extra else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {field}: {msg}") from None
    # Structure of every scale, and the job configs they extend, are checked even when only one is resolved.
    check_section(path, "", spec.base, spec.axes, spec.seeds)
    if spec.extends:
        _job_config(path, "", spec.extends)
    for name_, s in spec.scales.items():
        check_section(path, f"scales.{name_}.", s.base, s.axes, s.seeds)
        if s.extends:
            _job_config(path, f"scales.{name_}.", s.extends)
        check_tune(spec, path, name_)
    return spec, path


def scale_spec(spec: SweepSpec, path: Path, scale: str) -> ScaleSpec:
    """The named scale; a scale the spec does not define is a ConfigError naming the ones it does."""
    s = spec.scales.get(scale)
    if s is None:
        raise ConfigError(f"{path}: scales.{scale}: not defined in this sweep; allowed: "
                          f"{', '.join(spec.scales)}")
    return s


def make_plan(spec: SweepSpec, path: Path, scale: str, overrides: Sequence[str] = (),
              stage: Stage | None = None) -> Plan:
    """Resolve one scale (plus `--set key=value` overrides) into validated cells; a stage of a tuned scale
    (harness.sweep.stages) changes its cells, seeds or per-objective knobs after the overrides."""
    s = scale_spec(spec, path, scale)
    axes = replace_axes(spec.axes, s.axes)
    base = deep_merge(deep_merge(_extended(spec, path, scale, axes), nest(spec.base)), nest(s.base))
    seeds = list(s.seeds if s.seeds is not None else spec.seeds)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value (dotted keys reach nested fields)")
        value = parse_value(f"--set {key}", raw)
        if key == "seed":  # narrowing the replicates is the one use of --set seed
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"--set seed: expected an integer or a list of integers, got {raw!r}")
            check_values(f"--set {key}", values)
            seeds = [int(v) for v in values]
            continue
        if key in axes:  # narrowing an axis keeps the cells' identities (a sub-grid of the full sweep)
            joined = "+" in key and isinstance(value, list) and value and not isinstance(value[0], list)
            axes[key] = [value] if joined or not isinstance(value, list) else value
            check_axis(f"--set {key}", key, axes[key])
        else:
            check_key(f"--set {key}", key, axis=False)
            base = deep_merge(base, nest({key: value}))
    if s.confirms is not None and set(seeds) & spec.seeds_of(s.confirms):
        raise ConfigError(f"--set seed: {sorted(set(seeds) & spec.seeds_of(s.confirms))} also seed the "
                          f"exploration {s.confirms!r} that scale {scale!r} confirms; allowed: fresh seeds")
    if stage is not None and stage.cells is not None:
        axes = replace_axes(axes, {"batch_ratio+iterations": stage.cells})
    if stage is not None and stage.seeds is not None:
        seeds = list(stage.seeds)
    label_scale = contract.tune_scale(scale) if stage is not None and stage.name == "tune" else scale
    tuned = stage.per_objective if stage is not None else {}
    if "rollout_batches" not in base:
        raise ConfigError(f"{path}: scales.{scale}.base.rollout_batches: required (the training budget must "
                          "be explicit); set it in base, in the scale or in the job config it extends")
    experiment = contract.experiment_name(spec.study, label_scale)
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for seed in seeds:
        for combo in itertools.product(*axes.values()):
            point = grid_point(axes, combo)
            raw_cfg = deep_merge(base, nest(point))
            raw_cfg = deep_merge(raw_cfg, nest(tuned.get(raw_cfg.get("objective"), {})))
            if (s.on_policy_seeds is not None and label_scale == scale and seed not in seeds[:s.on_policy_seeds]
                    and _on_policy(raw_cfg)):
                continue
            raw_cfg.update(seed=seed, experiment=experiment)
            label = " ".join(f"{k}={v}" for k, v in {**point, "seed": seed}.items())
            where = f"{path}: scales.{scale}: cell {label}"
            cfg = build_config(raw_cfg, where)
            if s.gpus_per_job > 1:  # the global batch must split evenly over the job's processes
                try:
                    shape_of(cfg, s.gpus_per_job)
                except ValueError as e:
                    raise ConfigError(f"{where}: gpus_per_job={s.gpus_per_job}: {e}") from None
            digest = config_hash(cfg)
            if digest in seen:
                raise ConfigError(f"{path}: scales.{scale}: cells {seen[digest]!r} and {label!r} are the "
                                  "same job")
            seen[digest] = label
            cells.append(Cell(hash=digest, axes={**point, "seed": seed}, config=cfg))
    # Heaviest first, then by seed: the order the queue hands cells out in (harness.sweep.cost), so N workers
    # end the grid on short jobs together; a cell's objectives, of equal cost, run side by side.
    ordered = sorted(cells, key=lambda c: (-c.cost, seeds.index(c.axes["seed"])))
    return Plan(spec_path=path, spec=spec, scale=label_scale, base=base, axes=axes, seeds=seeds, cells=ordered,
                stage=stage.name if stage is not None else "grid", tuned=dict(tuned),
                gpus_per_job=s.gpus_per_job, deepspeed=s.deepspeed, cell_timeout_s=60 * s.cell_timeout_min,
                stall_timeout_s=60 * s.stall_timeout_min, device=s.device,
                confirms=s.confirms if label_scale == scale else None,
                reference_s=tuple(s.reference_s) if s.reference_s is not None else None)


# ------------------------------------------------------------------------------------------------- extends
def _job_config(path: Path, prefix: str, target: str) -> dict[str, Any]:
    """The job config file an `extends` names, read as `python -m harness train` reads it; keys checked."""
    file = path.parent / target
    where = f"{path}: {prefix}extends: {target}"
    if not file.is_file():
        raise ConfigError(f"{where}: no such file; allowed: a job config path relative to the sweep file's "
                          "folder (e.g. ../configs/proxy.yaml)")
    raw = read_mapping(file, where)
    for key in raw:
        if "." in str(key):  # `train` reads a job config's sections nested, never as dotted keys
            raise ConfigError(f"{where}: {key}: not a job field; allowed: nested sections (trl:, proxy:)")
    for key in leaf_keys(raw):
        if key.partition(".")[0] not in SWEEP_MANAGED:
            check_key(f"{where}: {key}", key, axis=False)
    return raw


def _extended(spec: SweepSpec, path: Path, scale: str, axes: dict[str, list[Any]]) -> dict[str, Any]:
    """What a scale's cells start from: its job configs (the sweep's, then the scale's), less the fields the
    sweep sets itself and those every cell takes from an axis."""
    out: dict[str, Any] = {}
    for prefix, target in (("", spec.extends), (f"scales.{scale}.", spec.scales[scale].extends)):
        if target:
            out = deep_merge(out, _job_config(path, prefix, target))
    for field in [*SWEEP_MANAGED, *(f for key in axes for f in key.split("+"))]:
        top, _, sub = field.partition(".")
        if not sub:
            out.pop(top, None)
        elif isinstance(out.get(top), dict):
            out[top].pop(sub, None)
    return out
