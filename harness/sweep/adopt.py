"""What an attempt came to, read from its own traces: its result file, else its MLflow run.

Whoever settles an attempt (its worker, the reaper of a dead worker, a restarted driver) asks here first, so
an attempt whose job reached its result is adopted, never re-run. A kill can land after the job finished its
MLflow run and wrote its result, but before the worker recorded it; or between the MLflow run's end and the
result file (job.py ends the run, then writes the file). Hence two sources:

1. `jobs/<cell>/attempt-<n>.result.json` (the job's `--result`, contract.attempt_result): status
   complete/diverged -> a result.
2. Otherwise the attempt's MLflow run (tags harness.cell and harness.attempt): harness.status
   complete/diverged -> a result (a run still RUNNING with that tag is finished here: its metrics are all
   logged). The run must be this ledger's (tag harness.ledger: the ledger's id) and have started at or
   after the attempt was claimed: one experiment can hold the runs of an earlier ledger of the same sweep
   (its folder wiped, the MLflow store kept) or of a second ledger, with this attempt's cell and number. A
   run without the tag (made before ledgers had ids) is adopted only by a ledger without an id.

When neither says so and MLflow cannot be asked (a tracking outage), the answer is `unknown`: the caller waits
rather than guessing, because guessing wrong means a second complete run of the cell.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

from harness import contract

log = logging.getLogger("harness.sweep.adopt")
result_path = contract.attempt_result  # one attempt's result file, the job's --result


@dataclasses.dataclass
class Verdict:
    kind: Literal["result", "none", "unknown"]
    # result.json's fields (status, run_id, ...)
    result: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""          # "file" or "mlflow"
    run_id: str | None = None  # the attempt's MLflow run, when one was found
    why: str = ""             # for unknown: what could not be asked
    where: tuple[Path, str, int] | None = None  # (sweep_dir, cell, attempt) it was found for

    def publish(self) -> None:
        """Make this adopted result the cell's result.json (atomically: a kill leaves the old or the new)."""
        if self.kind != "result" or self.where is None:
            return
        sweep_dir, cell, attempt = self.where
        dest = contract.cell_result(sweep_dir, cell)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".result.json.{os.getpid()}")
        tmp.write_text(json.dumps({**self.result, "attempt": attempt}, indent=1))
        os.replace(tmp, dest)

    def outcome(self, **base: Any) -> dict[str, Any]:
        """The ledger outcome of an adopted result (the worker's COMPLETE outcome, same fields)."""
        final = self.result.get("final") or {}
        val = final.get(contract.VAL_REWARD)
        val = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else None
        return {**base, "state": self.result["status"], "run_id": self.result.get("run_id"),
                "val_reward": val, "final": final, "wall_s": self.result.get("wall_s"),
                "adopted_from": self.source}


def read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent, or cut short by a kill
        return {}


def find(sweep_dir: Path, experiment: str, cell: str, attempt: int, ledger_id: str | None = None,
         claimed: float | None = None) -> Verdict:
    """What one attempt came to. ledger_id: the ledger's id (None: a ledger made before ids, whose attempts
    take any run of their cell and attempt); claimed: when the attempt was claimed (epoch s)."""
    where = (sweep_dir, cell, attempt)
    result = read_result(contract.attempt_result(sweep_dir, cell, attempt))
    if contract.is_result(result.get("status")):
        return Verdict("result", result, "file", result.get("run_id"), where=where)
    from harness import tracking

    down = tracking.unreachable()
    if down:
        return Verdict("unknown", why=down)
    try:
        run = attempt_run(tracking.client(), experiment, cell, attempt, ledger_id, claimed)
    except Exception as e:  # the store failed under us: do not guess
        return Verdict("unknown", why=f"MLflow {tracking.tracking_uri()}: {type(e).__name__}: {str(e)[:200]}")
    if run is None:
        return Verdict("none")
    status = run.data.tags.get(contract.STATUS)
    if not contract.is_result(status):
        return Verdict("none", run_id=run.info.run_id)
    if run.info.status == "RUNNING":  # killed between its last tag and set_terminated
        tracking.client().set_terminated(run.info.run_id, "FINISHED")
    final = {k: v for k, v in run.data.metrics.items()}
    return Verdict("result", {"status": status, "run_id": run.info.run_id, "final": final,
                              "config_hash": run.data.tags.get(contract.CONFIG_HASH)}, "mlflow",
                   run.info.run_id, where=where)


def attempt_run(client: Any, experiment: str, cell: str, attempt: int, ledger_id: str | None = None,
                claimed: float | None = None) -> Any | None:
    """The MLflow run of one attempt (the latest, should a job ever have made two), of this ledger and
    started since the attempt was claimed (see the module docstring)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{contract.CELL}` = '{cell}' and tags.`{contract.ATTEMPT}` = '{attempt}'"), max_results=100,
        order_by=["attributes.start_time DESC"])
    return next((r for r in runs if _bound(r, ledger_id, claimed)), None)


def _bound(run: Any, ledger_id: str | None, claimed: float | None) -> bool:
    """Whether a run of the attempt's cell and attempt number is this attempt's own."""
    if ledger_id is None:
        return True
    if run.data.tags.get(contract.LEDGER) != ledger_id:
        return False
    # MLflow's start time is the job's clock in ms; the claim is the claiming worker's, on the job's machine.
    return claimed is None or run.info.start_time >= int(claimed * 1000)


def close_run(run_id: str | None, experiment: str, cell: str, attempt: int, status: str, reason: str,
              ledger_id: str | None = None, claimed: float | None = None) -> None:
    """Best effort: an attempt that is not a result gets its MLflow run out of RUNNING, with why.

    A job killed by SIGKILL cannot end its own run; the driver's tidy-up would mark it KILLED later anyway.
    """
    from harness import tracking

    if tracking.unreachable():
        return
    try:
        client = tracking.client()
        run = (client.get_run(run_id) if run_id
               else attempt_run(client, experiment, cell, attempt, ledger_id, claimed))
        if run is None or run.info.status != "RUNNING":
            return
        client.set_tag(run.info.run_id, contract.STATUS, status)
        client.set_tag(run.info.run_id, contract.ERROR, reason[:500])
        client.set_terminated(run.info.run_id, "KILLED")
    except Exception as e:
        log.warning("could not close the MLflow run of cell %s attempt %d: %s", cell, attempt, e)


def supersede(run_id: str | None, reason: str) -> None:
    """A usable run the ledger did not count (its attempt was settled by another process meanwhile): tagged
    harness.status=superseded so the analysis does not count a second result for the cell."""
    from harness import tracking

    if not run_id or tracking.unreachable():
        return
    try:
        client = tracking.client()
        client.set_tag(run_id, contract.STATUS, contract.SUPERSEDED)
        client.set_tag(run_id, contract.SUPERSEDED_WHY, reason[:500])
    except Exception as e:
        log.warning("could not mark MLflow run %s superseded: %s", run_id, e)
