"""What a study declared before its runs: the `hypothesis:` and `learning_rate_from:` of its sweep file, and,
for a confirmatory scale (`confirms:`), its own hypothesis and the exploration it came from; for a tuned scale
(`tune:`), its tuning section.

The sweep file is `--spec PATH`, else `sweeps/<study>.yaml` under the working directory or the repository. A
study without a sweep file, or a sweep file without `hypothesis:`, gets the default question (harness.hypothesis)
and the report says so.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from pydantic import ValidationError

from analysis.errors import AnalysisError
from harness.hypothesis import Hypothesis

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Declared:
    hypothesis: Hypothesis
    source: str  # where it was declared: "sweeps/x.yaml", or why it is the default
    learning_rate_from: str  # "" when the sweep file does not say
    exploration: str | None = None  # the exploratory scale a confirmatory scale confirms
    exploration_seeds: tuple[int, ...] = ()
    confirmed_by: tuple[str, ...] = ()  # the confirmatory scales that test what this (exploratory) scale suggested
    tune: dict | None = None  # the scale's `tune:` section, when its objectives were tuned first (analysis.tuning)


def find_spec(study: str, spec: str | Path | None) -> Path | None:
    if spec is not None:
        if not Path(spec).is_file():
            raise AnalysisError(f"--spec {spec}: no such file; allowed: a sweep file (sweeps/NAME.yaml)")
        return Path(spec)
    return next((p for p in (Path("sweeps") / f"{study}.yaml", REPO / "sweeps" / f"{study}.yaml") if p.is_file()),
                None)


def declared(study: str, spec: str | Path | None = None, scale: str | None = None) -> Declared:
    """The declared question of `study` at `scale` (the scale's own hypothesis, else the sweep's); AnalysisError
    for a sweep file that is not valid or names another study."""
    path = find_spec(study, spec)
    if path is None:
        return Declared(Hypothesis(), f"default (no sweeps/{study}.yaml)", "")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AnalysisError(f"--spec {path}: cannot be read as YAML ({str(e).splitlines()[0]})") from None
    if raw.get("study") != study:
        raise AnalysisError(f"--spec {path}: declares study {raw.get('study')!r}, not {study!r}; allowed: the "
                            f"sweep file of {study}")
    scales = raw.get("scales") if isinstance(raw.get("scales"), dict) else {}
    own = scales.get(scale) if isinstance(scales.get(scale), dict) else {}
    where, text = (f"scales.{scale}.hypothesis", own["hypothesis"]) if own.get("hypothesis") else \
        ("hypothesis", raw.get("hypothesis"))
    try:
        hypothesis = Hypothesis.model_validate(text or {})
    except ValidationError as e:
        err = e.errors()[0]
        raise AnalysisError(f"{path}: {where}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    shown = path.resolve().relative_to(REPO).as_posix() if path.resolve().is_relative_to(REPO) else str(path)
    source = (f"{shown}" + (f" ({where})" if where != "hypothesis" else "")) if text else \
        f"default ({shown} declares no hypothesis)"
    exploration = own.get("confirms")
    explored = scales.get(exploration) if isinstance(scales.get(exploration), dict) else {}
    seeds = tuple(explored.get("seeds") or raw.get("seeds") or ()) if exploration else ()
    confirmed_by = tuple(n for n, s in scales.items() if isinstance(s, dict) and s.get("confirms") == scale)
    tune = own.get("tune") if isinstance(own.get("tune"), dict) else None
    return Declared(hypothesis, source, str(raw.get("learning_rate_from") or ""), exploration, seeds, confirmed_by,
                    tune)
