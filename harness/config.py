"""Typed, validated configuration of one training job.

A job config is a YAML file plus `key=value` overrides (dotted keys reach nested sections). Harness fields
are validated here; TRL's knobs keep `GRPOConfig`'s names and live in the `trl:` section, validated against
GRPOConfig itself. Every error is a `ConfigError` whose message names the field and what is allowed.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.checks import ConfigError, check_job
from harness.trl_args import MANAGED_TRL_KNOBS, shape_of


class ProxyModel(BaseModel):
    """Size of the tiny Llama-style model built for the offline proxy (cached on disk, keyed by these
    fields)."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(256, ge=8, description="width of the residual stream")
    intermediate_size: int = Field(512, ge=8, description="width of the MLP")
    num_hidden_layers: int = Field(2, ge=1, description="number of transformer blocks")
    num_attention_heads: int = Field(4, ge=1, description="attention heads (num_key_value_heads = heads/2)")
    warmstart_steps: int = Field(250, ge=0,
                                 description="supervised warm-start steps on the task's train split")
    warmstart_lr: float = Field(1e-3, gt=0, description="learning rate of the supervised warm start")
    warmstart_batch_size: int = Field(64, ge=1, description="sequences per warm-start step")
    init_seed: int | Literal["seed"] = Field(
        0, description="seed of the random init and the warm start; 'seed': the job's seed, so each seed gets its "
                       "own warm-started model (results generalise over checkpoints; one warm start per seed)")

    def for_seed(self, seed: int) -> ProxyModel:
        """The model a job of this seed builds: init_seed resolved when it follows the job's seed."""
        return self.model_copy(update={"init_seed": seed}) if self.init_seed == "seed" else self


class JobConfig(BaseModel):
    """One training job: a model, a task, an objective and a point on the (batch_ratio x iterations) grid."""

    model_config = ConfigDict(extra="forbid")

    objective: str = Field("grpo", description="policy objective, a name in harness.objectives.OBJECTIVES")
    model: str = Field("proxy", description="'proxy' (tiny model built offline) or a Hub name / local path")
    task: str = Field("chain-sum", description="task name in harness.tasks.TASKS")
    seed: int = Field(0, description="job seed: sampling, data order; a replicate index in sweeps")
    batch_ratio: int = Field(1, ge=1, description="optimizer steps per pass over a rollout batch "
                             "(= generation_batch_size / optimizer batch)")
    iterations: int = Field(1, ge=1, description="passes over each rollout batch (TRL num_iterations, mu)")
    rollout_batches: int = Field(100, ge=1, description="training budget: rollout batches generated per job")
    generation_batch_size: int = Field(64, ge=1, description="completions per rollout batch "
                                       "(prompts x num_generations)")
    eval_every: int = Field(10, ge=1, description="rollout batches between greedy validation evaluations")
    val_prompts: int = Field(256, ge=1, description="held-out prompts scored at each validation evaluation")
    train_prompts: int = Field(20000, ge=1, description="size of the generated train split")
    save_model: bool = Field(False, description="save the final policy to output_dir/model "
                             "(off: sweeps keep metrics only)")
    output_dir: str = Field("results/jobs/default",
                            description="folder for the job's log, config and result.json")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads on CPU "
                               "(one per job when jobs run side by side)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    experiment: str = Field("harness", description="MLflow experiment name (the sweep sets study/scale)")
    proxy: ProxyModel = Field(default_factory=ProxyModel,
                              description="tiny proxy model, used when model='proxy'")
    trl: dict[str, Any] = Field(default_factory=dict, description="GRPOConfig knobs, by GRPOConfig's names")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        from harness.objectives import OBJECTIVES

        if v not in OBJECTIVES:
            raise ValueError(f"unknown objective {v!r}; choose one of {sorted(OBJECTIVES)}")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from harness.tasks import TASKS

        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; choose one of {sorted(TASKS)}")
        return v

    @field_validator("trl")
    @classmethod
    def _trl_knobs(cls, v: dict[str, Any]) -> dict[str, Any]:
        hints = grpo_config_types()
        out = {}
        for key, value in v.items():
            if key in MANAGED_TRL_KNOBS:
                raise ValueError(f"trl.{key} is managed by the harness: {MANAGED_TRL_KNOBS[key]}")
            if key not in hints:
                raise ValueError(f"trl.{key} is not a GRPOConfig field "
                                 "(see trl.GRPOConfig for the allowed names)")
            out[key] = _coerce(key, value, hints[key])
        return out

    @model_validator(mode="after")
    def _combinations(self) -> JobConfig:
        from harness.objectives import SHARED_LOSS_TYPES, resolve_knobs

        shape_of(self)  # raises on impossible batch shapes
        loss_type = self.trl.get("loss_type", "dapo")
        # Every objective shares the study's aggregation: TRL's other loss types (cispo, sapo, ...) are
        # objectives of their own, and would run under the wrong name.
        if loss_type not in SHARED_LOSS_TYPES:
            raise ValueError(f"trl.loss_type={loss_type!r}: allowed: one of {', '.join(SHARED_LOSS_TYPES)} "
                             f"(the aggregation every objective shares; objective {self.objective!r})")
        # the objective's paper defaults, in the params too
        self.trl = resolve_knobs(self.objective, self.trl)
        return self


@functools.cache
def grpo_config_types() -> dict[str, Any]:
    from trl import GRPOConfig

    return typing.get_type_hints(GRPOConfig)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a TRL knob against GRPOConfig's annotation; YAML reads 1e-5 as a string, so coerce numbers."""
    try:
        adapter = TypeAdapter(hint)
    except Exception:  # an annotation pydantic cannot model: GRPOConfig itself will check the value
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError:
        raise ValueError(f"trl.{key}={value!r} does not fit GRPOConfig's type {hint}") from None


# ---------------------------------------------------------------------------------------------- loading
def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 c=x` -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (dotted keys reach nested fields)")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(key, raw)
    return tree


def parse_value(key: str, raw: str) -> Any:
    """One `key=value`'s value, read as YAML (1e-5 -> float, [1,2] -> list); malformed YAML is a
    ConfigError."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}={raw}: not a YAML value ({str(e).splitlines()[0]}); allowed: a scalar "
                          "such as 1e-5 or a list such as [1,2]") from None


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    """Validate a raw mapping, then its values by the objects the job builds (harness.checks); the first
    problem becomes a one-line ConfigError naming the field."""
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(_allowed_keys(err['loc']))}"
        # validators that name their own field (trl.*, cross-field checks) need no location prefix
        where = "" if not field or msg.startswith(field + ".") else f"{field}: "
        raise ConfigError(f"{source}: {where}{msg}") from None
    try:
        check_job(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return sorted(model.model_fields)


def read_mapping(file: Path, where: str, expect: str = "field: value") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (of `expect`); a ConfigError naming `where` otherwise."""
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read ({e}); allowed: a readable YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping of {expect}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        raw = read_mapping(path, str(path))
    return build_config(deep_merge(raw, parse_overrides(list(overrides))), source)


def config_hash(cfg: JobConfig, *, without_seed: bool = False) -> str:
    """Stable hash of everything that changes what a job computes (where it logs and writes excluded; the
    proxy section only counts for proxy jobs). `without_seed=True` gives the replicate hash: runs that share
    it differ only in their seed, so the analysis may treat them as seeds of one experiment."""
    exclude = {"output_dir", "experiment", "torch_threads"} | ({"proxy"} if cfg.model != "proxy" else set())
    if without_seed:
        exclude.add("seed")
    d = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
