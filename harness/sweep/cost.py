"""What a cell costs in seconds: the model the queue hands cells out by (heaviest first) and the dry run prints.

A cell's run time is a start-up plus a time proportional to spec.Cell.cost (rollout batches x (8 + optimizer
steps per rollout batch)). Where a sweep has finished cells, the two coefficients are fitted to their observed
durations (least squares), so the model follows the machine it runs on; before that, SECONDS gives the scale's
reference-machine values, and without those the cost itself is the estimate (order is all the queue needs).
A cell with earlier attempts (a timeout, a crash, a stopped job) is expected to take at least as long as the
longest of them ran: their time was observed, the model's is only predicted.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Sequence

# (start-up s, s per cost unit) on the 2-core reference machine, one job per core. Proxy: fitted on the
# grpo-vs-cfpo full-grid sweep with forked jobs (see the issue-12 note); paper: no reference run yet.
SECONDS: dict[str, tuple[float, float] | None] = {"proxy": (5.0, 0.095), "proxy-full": (5.0, 0.095), "paper": None}


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What the queue knows of one attempt: its cell, the cell's cost, how long it ran and whether it finished."""

    cell: str
    cost: float
    duration_s: float | None
    complete: bool


def fit(done: Iterable[Attempt]) -> tuple[float, float] | None:
    """(start-up, s per cost unit) by least squares over finished attempts; None without two distinct costs or
    with a non-positive slope (noise on near-equal costs), where the reference values serve better."""
    points = [(a.cost, a.duration_s) for a in done if a.complete and a.duration_s is not None]
    if len({c for c, _ in points}) < 2:
        return None
    slope, intercept = statistics.linear_regression([c for c, _ in points], [d for _, d in points])
    return (max(intercept, 0.0), slope) if slope > 0 else None


def predict(cost: float, model: tuple[float, float] | None) -> float:
    return model[0] + model[1] * cost if model else cost


def expected_seconds(cell: str, cost: float, history: Sequence[Attempt], scale: str) -> float:
    """Expected run time of the cell's next attempt, from the sweep's history (all attempts so far)."""
    model = fit(history) or SECONDS.get(scale)
    if model is None:  # cost units only: observed seconds cannot be weighed against them
        return cost
    ran = [a.duration_s for a in history if a.cell == cell and a.duration_s is not None]
    return max([predict(cost, model), *ran])
