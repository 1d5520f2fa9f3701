"""Which job fields a sweep file may set, and how: base keys (nested sections or dotted keys), axes (one field,
or fields joined by '+' that move together) and their values. Every check raises a ConfigError naming where
in the file and what is allowed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.config import ConfigError, JobConfig, ProxyModel, deep_merge

# Job fields the sweep sets itself; a spec that sets them would be silently overridden, so it is an error (a
# job config named by `extends` may set them: they are ignored there).
SWEEP_MANAGED = {
    "output_dir": "the sweep puts each job in results/<study>/<scale>/jobs/<cell>",
    "experiment": "the sweep logs to the MLflow experiment <study>/<scale>",
    "seed": "list replicate seeds under seeds: [...]",
}
# The budget is fixed per scale so that cells differ only in how they reuse rollouts.
NOT_AN_AXIS = {"rollout_batches": "the training budget is fixed per scale, so that cells differ only in "
                                  "rollout reuse; set it in base"}
NESTED = {"trl": None, "proxy": ProxyModel}  # sections reachable with dotted keys (trl: any GRPOConfig name)

def check_section(path: Path, prefix: str, base: dict[str, Any], axes: dict[str, list[Any]],
                   seeds: list[int] | None) -> None:
    for key in leaf_keys(base):
        check_key(f"{path}: {prefix}base.{key}", key, axis=False)
    for key, values in axes.items():
        check_axis(f"{path}: {prefix}axes.{key}", key, values)
    if seeds is not None:
        check_values(f"{path}: {prefix}seeds", seeds)


def check_key(where: str, key: str, axis: bool) -> None:
    top, _, sub = key.partition(".")
    if top not in JobConfig.model_fields:
        raise ConfigError(f"{where}: not a job field; allowed: {', '.join(sorted(JobConfig.model_fields))}")
    if top in SWEEP_MANAGED:
        raise ConfigError(f"{where}: set by the sweep ({SWEEP_MANAGED[top]})")
    if axis and top in NOT_AN_AXIS:
        raise ConfigError(f"{where}: cannot be an axis ({NOT_AN_AXIS[top]})")
    if not sub:
        if axis and top in NESTED:
            raise ConfigError(f"{where}: an axis is one field; use a dotted key such as {top}.<name>")
        return
    if top not in NESTED or "." in sub:
        raise ConfigError(f"{where}: {top} has no sub-field {sub!r}")
    model = NESTED[top]
    if model is not None and sub not in model.model_fields:
        raise ConfigError(f"{where}: not a {top} field; allowed: {', '.join(sorted(model.model_fields))}")


def check_axis(where: str, key: str, values: list[Any]) -> None:
    fields = key.split("+")
    for field in fields:
        check_key(where, field, axis=True)
    if len(fields) == 1:
        return check_values(where, values)
    if len(set(fields)) < len(fields):
        raise ConfigError(f"{where}: a field appears twice")
    if not isinstance(values, list) or not all(isinstance(v, list) and len(v) == len(fields) for v in values):
        raise ConfigError(f"{where}: values must be lists of {len(fields)} scalars, one per joined field")
    for i, field in enumerate(fields):
        check_values(f"{where} ({field})", [v[i] for v in values], unique=False)
    check_values(where, [json.dumps(v) for v in values])


def grid_point(axes: dict[str, list[Any]], combo: tuple[Any, ...]) -> dict[str, Any]:
    """One grid point as job fields: a joined axis ('a+b': [x, y]) gives a=x, b=y."""
    point: dict[str, Any] = {}
    for key, value in zip(axes, combo, strict=True):
        point.update(zip(key.split("+"), value, strict=True) if "+" in key else {key: value})
    return point


def check_values(where: str, values: list[Any], unique: bool = True) -> None:
    if not values:
        raise ConfigError(f"{where}: needs at least one value")
    seen = set()
    for v in values:
        if isinstance(v, (dict, list)):
            raise ConfigError(f"{where}: values must be scalars, got {v!r}")
        key = json.dumps(v, sort_keys=True, default=repr)  # YAML may give dates
        if unique and key in seen:
            raise ConfigError(f"{where}: duplicate value {v!r}")
        seen.add(key)


def leaf_keys(d: dict[str, Any]) -> list[str]:
    """Dotted keys of a base mapping; only trl and proxy are sections (a dict-valued TRL knob stays whole)."""
    out = []
    for k, v in d.items():
        if k in NESTED and isinstance(v, dict):
            out += [f"{k}.{sub}" for sub in v] or [k]
        else:
            out.append(k)
    return out


def nest(d: dict[str, Any]) -> dict[str, Any]:
    """{'trl.learning_rate': 1e-5, 'proxy': {...}} -> nested mapping, as JobConfig takes it."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        top, dot, sub = k.partition(".")
        piece = {top: {sub: v}} if dot else {k: v}
        out = deep_merge(out, piece)
    return out


def replace_axes(axes: dict[str, list[Any]], new: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """New axes replace the ones over the same fields, joined (a+b) or not."""
    axes = dict(axes)
    for key in new:
        for other in [k for k in axes if set(k.split("+")) & set(key.split("+"))]:
            del axes[other]
    axes.update(new)
    return axes
