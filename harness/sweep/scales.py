"""A sweep file's scales as data: where a scale's jobs run, its limits and reference costs (defaults by
device), and what it changes of the sweep's base, axes, seeds and question."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from harness.hypothesis import Hypothesis
from harness.sweep.cost import PROXY_REFERENCE_S
from harness.sweep.tune_spec import TuneSpec


@dataclasses.dataclass(frozen=True)
class DeviceDefaults:
    """What a scale that leaves out its limits or reference costs gets, by its device."""

    cell_timeout_min: float
    stall_timeout_min: float
    reference_s: tuple[float, float] | None


DEFAULT_DEVICE = "cpu"  # a scale runs on any machine unless it says it needs a GPU
# Limits far above any healthy cell (cpu: the proxy, about 2 min a cell, the first one building the warm
# start; cuda: hours a cell, vLLM start-up and 500-prompt validations between metrics). Reference costs: the
# proxy's on the reference machine for cpu; none for cuda, where no reference run was made.
DEVICE_DEFAULTS = {"cpu": DeviceDefaults(6 * 60.0, 30.0, PROXY_REFERENCE_S),
                   "cuda": DeviceDefaults(72 * 60.0, 120.0, None)}
CPU_DEFAULTS = DEVICE_DEFAULTS[DEFAULT_DEVICE]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ScaleSpec(BaseModel):
    """One scale: where its jobs run, what it changes of the sweep's base, axes and seeds, and its limits."""

    model_config = ConfigDict(extra="forbid")
    description: str = Field(
        "", description="what this scale is for; logged on the sweep's parent MLflow run")
    extends: str | None = Field(
        None, description="job config file (relative to the sweep file's folder) this scale starts from, "
                          "over the sweep's extends; its seed, output_dir, experiment and axis fields are "
                          "ignored")
    device: Literal["cpu", "cuda"] = Field(
        DEFAULT_DEVICE, description="where the jobs run: cuda needs a GPU (`--scale auto` passes over the "
                                    "scale without one) and sets the limits' and reference costs' defaults")
    base: dict[str, Any] = Field(
        default_factory=dict, description="job fields merged over the sweep's base (nested sections or "
                                          "dotted keys)")
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="axes replaced, key by key, at this scale; other axes are kept")
    seeds: list[StrictInt] | None = Field(
        None, description="replicate seeds at this scale (default: the sweep's)")
    gpus_per_job: StrictInt = Field(
        1, ge=1, description="GPUs per job: k > 1 runs each job as `accelerate launch --num_processes k`, "
                             "and a machine with G GPUs runs floor(G/k) jobs at a time, each on its own k "
                             "devices (harness/launch.py); must be 1 on CPU machines")
    deepspeed: Literal["none", "zero2"] = Field(
        "none", description="zero2: launch multi-GPU jobs with DeepSpeed ZeRO-2 "
                            "(configs/accelerate/zero2.yaml); none: plain data parallel")
    cell_timeout_min: float = Field(
        CPU_DEFAULTS.cell_timeout_min, gt=0,
        description="wall-clock limit of one job, in minutes; a job past it is stopped and its attempt "
                    "recorded as timeout (default: 360 on cpu, 4320 on cuda; `sweep --cell-timeout-min` "
                    "overrides)")
    stall_timeout_min: float = Field(
        CPU_DEFAULTS.stall_timeout_min, gt=0,
        description="minutes a job may go without storing a metric (start-up included) before it counts as "
                    "hung (default: 30 on cpu, 120 on cuda; `sweep --stall-timeout-min` overrides)")
    hypothesis: Hypothesis | None = Field(
        None, description="the question this scale tests, when not the sweep's (a confirmation's, written "
                          "from its exploration before it runs)")
    confirms: str | None = Field(
        None, description="the exploratory scale of this file whose published results suggested the "
                          "hypothesis this scale tests: its seeds must be fresh (none of that scale's), and its "
                          "report names the exploration")
    on_policy_seeds: StrictInt | None = Field(
        None, ge=1, description="run on-policy cells (batch ratio x iterations = 1) with only the first n seeds: "
                                "their objectives' differences are exactly 0 by construction, so the control "
                                "needs one or two (default: every seed)")
    tune: TuneSpec | None = Field(
        None, description="a tuning stage before the comparison: each objective's knobs tuned with the same "
                          "Optuna budget on tuning seeds, then compared at its best setting "
                          "(harness/sweep/tune_spec.py)")
    reference_s: tuple[Seconds, Seconds] | None = Field(
        CPU_DEFAULTS.reference_s,
        description="[start-up s, s per cost unit] of a job on the reference machine: the queue's order and "
                    "the dry run's estimate until the sweep's own durations fit them (default: the proxy's "
                    "on cpu; null, the cuda default: unknown)")

    @model_validator(mode="before")
    @classmethod
    def _device_defaults(cls, data: Any) -> Any:
        """Limits left out (or null) and reference costs left out take the defaults of the scale's device."""
        device = data.get("device", DEFAULT_DEVICE) if isinstance(data, dict) else None
        if not isinstance(device, str) or device not in DEVICE_DEFAULTS:
            return data  # pydantic reports what is wrong
        defaults = DEVICE_DEFAULTS[device]
        out = dict(data)
        for key in ("cell_timeout_min", "stall_timeout_min"):
            if out.get(key) is None:
                out[key] = getattr(defaults, key)
        out.setdefault("reference_s", defaults.reference_s)
        return out

    @model_validator(mode="after")
    def _deepspeed_needs_gpus(self) -> ScaleSpec:
        if self.deepspeed != "none" and self.gpus_per_job < 2:
            raise ValueError(f"deepspeed: {self.deepspeed} shards a job across its GPUs; it needs "
                             f"gpus_per_job of 2 or more (got {self.gpus_per_job})")
        return self
