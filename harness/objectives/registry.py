"""The objective registry: a name, one function for the per-token (or per-sequence) term, and its knobs.

An objective's knobs are TRL's own GRPOConfig fields (`epsilon`, `epsilon_high`, `delta`,
`sapo_temperature_pos`, `sapo_temperature_neg`), with the paper's defaults. A job that names an objective gets
those defaults filled into its `trl:` section (so they are in the run's params and config hash), and setting an
objective knob the objective does not use is an error: a typo'd study must not run with a knob silently ignored.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

# The CFPO authors' verl code clamps log r to [-20, 20] before exp; the unclipped objectives need the same guard.
LOG_RATIO_CLAMP = 20.0
# TRL loss_type values whose aggregation every objective shares (see harness.trainer). TRL's own `cispo` and
# `sapo` loss types couple a term to one aggregation; here the term is the objective and the aggregation the study's.
SHARED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# GRPOConfig fields that belong to an objective: only the objectives that list one may set it.
OBJECTIVE_KNOBS = ("epsilon", "epsilon_high", "delta", "importance_sampling_level", "sapo_temperature_pos",
                   "sapo_temperature_neg")
# Would-be clip rates of objectives without a trust-region knob are measured against PPO's default region.
PPO_EPSILON = 0.2


@dataclasses.dataclass(frozen=True)
class Tokens:
    """What an objective sees of one micro-batch."""

    log_ratio: torch.Tensor  # log pi_theta - log pi_old: (B, T), or (B, 1) for a sequence-level objective
    advantages: torch.Tensor  # (B, 1)
    logps: torch.Tensor | None = None  # log pi_theta per token (B, T), for terms whose value uses it (cispo)


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The resolved objective knobs of a trainer (TRL's names; epsilon_low is TRL's `epsilon`)."""

    epsilon_low: float = PPO_EPSILON
    epsilon_high: float = PPO_EPSILON
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


@dataclasses.dataclass
class ObjectiveTerms:
    per_token_loss: torch.Tensor  # (B, T) or (B, 1); minimised
    extras: dict[str, torch.Tensor]  # per-token diagnostic terms, logged as "<objective>/<key>_mean"


ObjectiveFn = Callable[[Tokens, Knobs], ObjectiveTerms]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    fn: ObjectiveFn
    stock_trl: bool = False  # True: training runs GRPOTrainer's own loss code, untouched (fn is its formula)
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # knob -> paper default (None: TRL's)
    sequence_level: bool = False  # one ratio per sequence: exp(mean_t log r) over its completion tokens
    source: str = ""  # arXiv id of the paper the formula and defaults come from
    # knob -> (check, what is allowed): ranges that hold for this objective only (general ones: harness.checks)
    rules: Mapping[str, tuple[Callable[[Any], bool], str]] = dataclasses.field(default_factory=dict)

    @property
    def has_trust_region(self) -> bool:
        return "epsilon" in self.knobs


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, stock_trl: bool = False, knobs: Mapping[str, Any] | None = None,
                       sequence_level: bool = False, source: str = "",
                       rules: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None,
                       ) -> Callable[[ObjectiveFn], ObjectiveFn]:
    unknown = set(knobs or {}) - set(OBJECTIVE_KNOBS)
    if unknown:
        raise ValueError(f"objective {name!r}: knobs {sorted(unknown)} are not objective knobs {OBJECTIVE_KNOBS}")

    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, fn, stock_trl, dict(knobs or {}), sequence_level, source, dict(rules or {}))
        return fn

    return wrap


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}") from None


def resolve_knobs(name: str, trl: dict[str, Any]) -> dict[str, Any]:
    """`trl` with the objective's paper defaults filled in; ValueError naming a knob the objective does not use."""
    objective = get_objective(name)
    for key in trl:
        if key in OBJECTIVE_KNOBS and key not in objective.knobs:
            allowed = ", ".join(f"trl.{k}" for k in objective.knobs) or "none"
            raise ValueError(f"trl.{key} is not used by objective {name!r}; its knobs: {allowed}")
    resolved = {**trl, **{k: v for k, v in objective.knobs.items() if v is not None and k not in trl}}
    for key, (check, allowed) in objective.rules.items():
        if key in resolved and not check(resolved[key]):
            raise ValueError(f"trl.{key}={resolved[key]!r}: allowed for objective {name!r}: {allowed}")
    return resolved


def clamped_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(log r) with log r clamped, for terms unbounded in r (a guard, never active in a healthy run)."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
