"""What a sweep will cost before it runs (`sweep --dry-run`), and how busy its workers were after
(utilisation).

Cost model: harness.sweep.cost (start-up + s per unit of spec.Cell.cost; the scale's reference_s).
The total is the makespan of the order workers really take cells in (the plan's and the queue's: heaviest
first), each worker taking the next queued cell the moment it is free.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from harness.objectives.registry import OBJECTIVE_KNOBS
from harness.sweep.cost import predict
from harness.sweep.display import fmt_s
from harness.sweep.spec import Cell, Plan
from harness.trl_args import shape_of


def makespan(durations: Iterable[float], workers: int) -> float:
    """Wall time for `workers` to run jobs of these durations, taken in this order by whichever is free
    first."""
    free = [0.0] * max(workers, 1)
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def cell_row(cell: Cell, seconds: tuple[float, float] | None) -> dict[str, Any]:
    cfg = cell.config
    shape = shape_of(cfg)
    knobs = {k: v for k, v in cfg.trl.items() if k in OBJECTIVE_KNOBS}
    return {"cell": cell.hash, "axes": cell.label(),
            "objective knobs": " ".join(f"{k}={v}" for k, v in knobs.items()),
            "micro-batch": shape.per_device_train_batch_size,
            "steps_per_generation": shape.steps_per_generation,
            "gradient_accumulation_steps": shape.gradient_accumulation_steps,
            "num_iterations": shape.num_iterations,
            "optimizer steps": cfg.rollout_batches * shape.optimizer_steps_per_rollout_batch,
            "est_s": predict(cell.cost, seconds) if seconds else None}


def print_dry_run(plan: Plan, workers: int, out: Any) -> None:
    """The cells a sweep would run, how each maps onto TRL, and what it would cost; writes nothing."""
    from rich.table import Table

    rate = plan.reference_s
    rows = [cell_row(c, rate) for c in plan.cells]
    title = f"{plan.experiment}: {len(rows)} cells, in the order workers take them"
    if plan.stage == "tune":  # each row runs once per trial, with the trial's knobs
        tune = plan.spec.scales[plan.base_scale].tune
        trials = {o: tune.trials_of(o) for o in sorted({c.config.objective for c in plan.cells})}
        title = (f"{plan.experiment}: {len(rows)} template cells, each run once per trial of its objective "
                 f"({', '.join(f'{o} {n}' for o, n in trials.items())} trials), with the trial's "
                 f"{', '.join(sorted({k for o in trials for k in tune.knobs_of(o)}))}")
        rows = [r for c in plan.cells for r in [cell_row(c, rate)] * trials[c.config.objective]]
    table = Table(title=title)
    for key in rows[0] if rows else ():
        table.add_column(key if key != "est_s" else "est. time", no_wrap=key == "cell")
    for r in rows:
        table.add_row(*[fmt_s(v) if k == "est_s" else str(v) for k, v in r.items()])
    out.print(table)
    if rate is None:
        out.print(f"estimated time: unknown at the {plan.scale} scale (no reference run); "
                  f"{sum(c.cost for c in plan.cells):.0f} cost units in all", soft_wrap=True)
    else:
        total = sum(r["est_s"] for r in rows)
        wall = makespan([r["est_s"] for r in rows], workers)
        out.print(f"estimated time: {fmt_s(total)} of jobs; {fmt_s(wall)} wall with {workers} worker(s) "
                  "(one job per core on the 2-core reference machine; start-up of the proxy model's warm "
                  "start not included" + ("; pruned trials end sooner" if plan.stage == "tune" else "") + ")",
                  soft_wrap=True)
    if plan.confirms is not None:
        for line in power_lines(plan):
            out.print(line, soft_wrap=True)
    out.print("dry run: nothing written (no ledger, no MLflow run, no folder)")


def power_lines(plan: Plan) -> list[str]:
    """What the planned seeds can detect, from the published exploration this scale confirms."""
    # The analysis's own reduction of runs to per-seed contrasts, so the design and the verdict agree; imported
    # here only, as the dry run is the one place the sweep reads a published study.
    from analysis.errors import AnalysisError
    from analysis.layout import PUBLISHED_ROOT
    from analysis.planning import power_plan

    hypothesis = plan.hypothesis
    runs = PUBLISHED_ROOT / plan.study / str(plan.confirms) / "tables" / "runs.csv"
    seeds = len(plan.seeds)
    head = (f"power ({hypothesis.measure}, {hypothesis.contrast} over {hypothesis.cells}, alpha "
            f"{hypothesis.alpha:g}), from the exploration {plan.confirms} ({runs.parent.parent}):")
    try:
        plans = power_plan(runs, hypothesis, seeds)
    except AnalysisError as e:
        return [f"{head} unknown: {e}"]
    baseline = hypothesis.baseline or "the first objective"
    return [head, *(f"  {p.describe(baseline, hypothesis.margin)}" for p in plans)]


def utilisation(intervals: Iterable[tuple[datetime | None, datetime | None]], since: datetime,
                until: datetime, workers: int) -> float | None:
    """Busy worker-seconds / (workers x wall time) over [since, until], from the attempts' start and end
    times."""
    wall = (until - since).total_seconds()
    if workers < 1 or wall <= 0:
        return None
    busy = 0.0
    for start, end in intervals:
        if start is None:
            continue
        lo, hi = max(start, since), min(end or until, until)
        busy += max((hi - lo).total_seconds(), 0.0)
    return busy / (workers * wall)

