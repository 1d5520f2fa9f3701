"""Which of a sweep file's scales runs here (`--scale auto`: the first whose device this machine has), and a
check of the others, so a broken scale is known before a long run of another."""
from __future__ import annotations

from pathlib import Path

from harness.config import ConfigError
from harness.sweep.spec import SweepSpec, make_plan, scale_spec


def check_other_scales(spec: SweepSpec, path: Path, selected: str) -> list[str]:
    """Validate the scales not being run (without --set): all are one experiment, so a broken paper grid is
    worth knowing about before a proxy run. A task not registered on this machine is only a warning."""
    warnings = []
    for name in spec.scales:
        if name == selected:
            continue
        try:
            make_plan(spec, path, name)
        except ConfigError as e:
            if "unknown task" not in str(e):
                raise
            warnings.append(f"warning: {e} (scale {name} left unchecked)")
    return warnings


def pick_scale(spec: SweepSpec, path: Path, scale: str) -> tuple[str, str]:
    """`auto` -> the first scale, in the file's order, whose device is here (cuda: a GPU); another name
    must be one of the spec's scales. Returns (scale, why)."""
    if scale != "auto":
        scale_spec(spec, path, scale)
        return scale, "asked for"
    skipped = []
    for name, s in spec.scales.items():
        if s.device != "cuda":
            why = f"no CUDA device for {', '.join(skipped)}" if skipped else "the sweep file's first scale"
            return name, f"auto: {why}"
        import torch

        if torch.cuda.is_available():
            return name, f"auto: CUDA is available ({torch.cuda.device_count()} GPU)"
        skipped.append(name)
    raise ConfigError(f"{path}: scales: every scale has device: cuda and this machine has no CUDA device; "
                      f"allowed here: a scale with device: cpu ({', '.join(spec.scales)}: cuda)")
