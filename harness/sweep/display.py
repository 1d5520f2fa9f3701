"""What a person sees: live progress while a sweep runs, and the `status` table read from the ledger.

On a terminal the driver shows a live panel (done / running / failed, ETA, the running cells); otherwise
(logs, CI, pipes) it prints one plain line per settled attempt, so a log file gets no control characters.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from harness import contract
from harness.redact import redact
from harness.sweep.ledger import ATTEMPT, AXES, CELL, OUTCOME, REAPED, CellStatus, Ledger, attempt_state


def console() -> Console:
    # Not a terminal: a fixed wide width, so tables in log files are not wrapped at 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _axes_text(axes: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in axes.items())


def eta_s(cells: list[CellStatus], parallel: int) -> float | None:
    """Seconds left: measured seconds per unit of cost (spec.Cell.cost) times the cost still to run."""
    done = [c for c in cells if contract.is_result(c.state) and c.duration_s]
    if not done:
        return None
    rate = sum(c.duration_s for c in done) / sum(c.cost for c in done)  # type: ignore[misc]
    now = time.time()
    left = sum(c.cost * rate for c in cells if c.state == "queued")
    left += sum(max(c.cost * rate - (now - (c.started or now)), 0.0) for c in cells
                if c.state == contract.RUNNING)
    return left / max(parallel, 1)


class SweepView:
    """Progress of the plan's cells; `update()` re-reads the ledger (call it from the driver's loop)."""

    def __init__(self, ledger: Ledger, title: str, cell_hashes: list[str] | None, workers: int,
                 total: int | None = None):
        """cell_hashes None: every cell of the ledger (a tuning stage's, queued as trials are asked), of
        `total` expected."""
        self.ledger, self.title, self.workers = ledger, title, workers
        self.hashes = set(cell_hashes) if cell_hashes is not None else None
        self.total = total if total is not None else len(cell_hashes or [])
        self.out = console()
        self.live: Live | None = None
        self.cells: list[CellStatus] = []
        # Attempts settled before this view started are not announced again.
        self.announced = {t.number for t in ledger.trials() if t.state.is_finished()}

    def __enter__(self) -> SweepView:
        if self.out.is_terminal:
            self.live = Live(get_renderable=self.render, console=self.out, refresh_per_second=2,
                             transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self) -> None:
        self.cells = [c for c in self.ledger.cells() if self._shown(c.hash)]
        self._print_settled()  # above the live panel on a terminal, as plain lines otherwise

    def _shown(self, cell: str) -> bool:
        return self.hashes is None or cell in self.hashes

    def count(self, *states: str) -> int:
        return sum(1 for c in self.cells if c.state in states)

    def summary(self) -> str:
        eta = eta_s(self.cells, min(self.workers or 1, max(self.count(contract.RUNNING, "queued"), 1)))
        return (f"{self.count(*contract.FINISHED)}/{self.total} done "
                f"({self.count(contract.DIVERGED)} diverged), "
                f"{self.count(contract.RUNNING)} running, {self.count('queued')} queued, "
                f"{self.count(contract.FAILED, 'interrupted')} failed, "
                f"ETA {fmt_s(eta) if eta is not None else '?'}")

    def render(self) -> Group:
        head = Table.grid(padding=(0, 1))
        settled = self.count(*contract.FINISHED, contract.FAILED)
        head.add_row(ProgressBar(total=max(self.total, 1), completed=settled, width=30), Text(self.summary()))
        parts: list[Any] = [Text(self.title, style="bold"), head]
        now = time.time()
        rows = [(_axes_text(c.axes), c.hash, str(c.attempt), fmt_s(now - (c.started or now)),
                 (c.worker or "?") + (" (stale)" if c.stale else ""))
                for c in self.cells if c.state == contract.RUNNING]
        if rows:
            running = Table(box=None, header_style="dim", pad_edge=False)
            for col in ("running", "cell", "attempt", "for", "worker"):
                running.add_column(col)
            for row in rows:
                running.add_row(*row)
            parts.append(running)
        return Group(*parts)

    def _print_settled(self) -> None:
        for t in self.ledger.trials((TrialState.COMPLETE, TrialState.FAIL)):
            if t.number in self.announced or not self._shown(t.user_attrs[CELL]):
                continue
            self.announced.add(t.number)
            state = attempt_state(t)
            if state == "duplicate":
                continue
            o = t.user_attrs.get(OUTCOME) or {}
            extra = f" val/reward={o['val_reward']:.3f}" if o.get("val_reward") is not None else ""
            err = redact(o.get("error") or t.user_attrs.get(REAPED) or "")  # a ledger from before redaction
            settled = self.count(*contract.FINISHED, contract.FAILED)
            self.out.print(f"[{settled}/{self.total}] {state} {t.user_attrs[CELL]} attempt "
                           f"{t.user_attrs[ATTEMPT]} {_axes_text(t.user_attrs[AXES])} "
                           f"{fmt_s(o.get('duration_s'))}{extra}" + (f" ({err})" if err else ""),
                           highlight=False, soft_wrap=True, markup=False)


def status_table(cells: list[CellStatus], title: str, sweep_dir: Path) -> Table:
    """One row per cell: axes, state, attempt, duration, last validation reward (from result.json)."""
    keys: list[str] = []
    for c in cells:
        keys += [k for k in c.axes if k not in keys]
    table = Table(title=title, title_justify="left")
    table.add_column("cell")
    for k in keys:
        table.add_column(k, justify="right")
    for col in ("state", "attempt", "duration", "val/reward", "note"):
        table.add_column(col, justify="right" if col in ("attempt", "duration", "val/reward") else "left")
    now = time.time()
    for c in sorted(cells, key=lambda c: [json.dumps(c.axes.get(k)) for k in keys]):
        val = _val_reward(contract.cell_result(sweep_dir, c.hash), c.val_reward)
        dur = c.duration_s if c.state != contract.RUNNING else now - (c.started or now)
        state = c.state + (" (stale)" if c.stale else "")
        note = c.log if c.state == contract.RUNNING else c.error if c.state != contract.COMPLETE else ""
        table.add_row(c.hash, *[str(c.axes.get(k, "")) for k in keys], state, str(c.attempt), fmt_s(dur),
                      f"{val:.3f}" if val is not None else "-", redact(note or "")[:80])
    return table


def _val_reward(path: Path, fallback: float | None) -> float | None:
    try:
        v = json.loads(path.read_text())["final"][contract.VAL_REWARD]
        return float(v)
    except (OSError, ValueError, KeyError, TypeError):
        return fallback
