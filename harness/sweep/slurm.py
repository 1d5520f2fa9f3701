"""What a worker running as a SLURM job knows of its own time limit, and what the driver asks the scheduler.

A worker never takes a cell it cannot finish before its job's time limit: it asks SLURM how long it has left
(`squeue -o %L` for $SLURM_JOB_ID) and pops only cells expected to end in time (harness.sweep.cost), keeping a
margin for the job's start-up, its settling, and the scheduler's kill delay. When nothing queued fits, it
leaves; the driver submits a fresh worker while work remains (harness.sweep.driver).
"""
from __future__ import annotations

import os
import re
import subprocess

NOTHING_FITS = 3  # a worker's exit code: queued cells remain, none fits in the time its job has left
NEVER_FITS = 4  # the same, from a worker that ran nothing: its whole time limit is too short for them


def margin_s(left: float) -> float:
    """Time kept free before the limit: for settling and for a cell running longer than expected; a tenth of
    what is left, between 15 s and 10 min."""
    return min(600.0, max(15.0, 0.1 * left))


def parse_time_left(text: str) -> float | None:
    """squeue's %L: [days-]hours:minutes:seconds, minutes:seconds, or UNLIMITED / NOT_SET / INVALID."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def job_id() -> str | None:
    """This process's SLURM job as squeue and scancel name it (`<array>_<task>` for an array task, whose bare
    $SLURM_JOB_ID scancel refuses as invalid); None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else job


def time_left_s() -> float | None:
    """Seconds this SLURM job has left before its time limit; None outside SLURM or without a limit."""
    ident = job_id()
    if not ident:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", ident, "-o", "%L"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return parse_time_left(lines[0]) if lines else None
