"""What a cell costs in seconds: the model the queue hands cells out by (heaviest first) and the dry run
prints.

A cell's run time is a start-up plus a time proportional to its cost (cell_cost), in passes over a rollout
batch: each rollout batch is generated (GEN_PASSES), then trained on for `iterations` passes split into
`batch_ratio` optimizer steps each (STEP_PASSES per step: optimizer, logging and per-step overhead). The work
of a pass does not depend on how many steps it is split into, so (1, 8) costs about what (8, 8) does, not what
(8, 1) does. Where a sweep has finished cells, the two coefficients are fitted to their observed durations
(least squares), so the model follows the machine it runs on; before that, the scale's reference costs
(`reference_s` in its spec, recorded in its ledger) give the reference machine's values, and without those
the cost itself is the estimate (order is all the queue needs). A cell with earlier attempts (a timeout, a
crash, a stopped job) is expected to take at least as long as the longest of them ran: their time was
observed, the model's is only predicted.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Sequence

# Least squares on the median durations of grpo-vs-cfpo's proxy-full sweep (96 cells, forked jobs, 2 workers
# on the 2-core reference machine): every (batch_ratio, iterations) within 15%; a cost that counts optimizer
# steps instead of passes is off by up to 80%.
GEN_PASSES = 1.2    # generation and amortised greedy validation, per rollout batch
STEP_PASSES = 0.02  # per optimizer step
# (start-up s, s per cost unit) of the offline proxy on the reference machine, one job per core (same fit;
# start-up of a forked job to its first generation, from `just bench`): a cpu scale's default reference_s.
PROXY_REFERENCE_S = (3.0, 0.505)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What the queue knows of one attempt: its cell, the cell's cost, how long it ran and whether it
    finished."""

    cell: str
    cost: float
    duration_s: float | None
    complete: bool


def cell_cost(rollout_batches: int, batch_ratio: int, iterations: int) -> float:
    """Passes over a rollout batch, generation and per-step overhead included."""
    return float(rollout_batches * (GEN_PASSES + iterations * (1 + STEP_PASSES * batch_ratio)))


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


def model_for(history: Sequence[Attempt],
              reference: tuple[float, float] | None) -> tuple[float, float] | None:
    """The sweep's own fit where it has one, else the scale's reference values (None: neither)."""
    return fit(history) or reference


def expected_seconds(cell: str, cost: float, history: Sequence[Attempt],
                     model: tuple[float, float] | None) -> float:
    """Expected run time of the cell's next attempt, from the sweep's history (all attempts so far)."""
    if model is None:  # cost units only: observed seconds cannot be weighed against them
        return cost
    ran = [a.duration_s for a in history if a.cell == cell and a.duration_s is not None]
    return max([predict(cost, model), *ran])
