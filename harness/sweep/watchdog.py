"""Limits on one running job: a wall-clock limit per cell, and a stall limit (no new metric for a while).

A job that hangs with its process alive (a deadlocked collective, a stuck data loader, a tracking call that never
returns) keeps its worker's heartbeat fresh, so nothing else would ever end it. The job touches a progress file
whenever it stores a metric (harness.tracking, HARNESS_PROGRESS_FILE); the worker asks `Watchdog.check` while
it waits and stops the job when either limit is passed. The stall clock starts with the job, so start-up (model
download, warm start, vLLM) must fit in the stall limit too: the defaults are generous (harness.sweep.spec).
"""
from __future__ import annotations

import time
from pathlib import Path


class Watchdog:
    def __init__(self, progress: Path, limit_s: float, stall_s: float, started: float | None = None):
        self.progress, self.limit_s, self.stall_s = progress, limit_s, stall_s
        self.started = time.time() if started is None else started
        # Progress is a change of the file's mtime seen on this machine's monotonic clock: on a network file
        # system the mtime is the server's clock, which need not agree with ours.
        self.mtime: float | None = None
        self.moved = time.monotonic() - (time.time() - self.started)

    def last_progress(self) -> float:
        """Monotonic time of the last progress seen (the job's start before any)."""
        try:
            mtime = self.progress.stat().st_mtime
        except OSError:
            return self.moved
        if mtime != self.mtime:
            self.mtime, self.moved = mtime, time.monotonic()
        return self.moved

    def check(self, now: float | None = None) -> str | None:
        """None while the job is within its limits; else why it is to be stopped (one line). now: wall-clock
        seconds, for the cell limit (tests pass it); the stall clock is monotonic."""
        now = time.time() if now is None else now
        if now - self.started > self.limit_s:
            return f"ran past the cell time limit of {_fmt(self.limit_s)}"
        quiet = time.monotonic() + (now - time.time()) - self.last_progress()
        if quiet > self.stall_s:
            return f"no new metric for {_fmt(quiet)} (stall limit {_fmt(self.stall_s)})"
        return None


def _fmt(s: float) -> str:
    return f"{s / 60:.4g} min" if s >= 60 else f"{s:.3g} s"
