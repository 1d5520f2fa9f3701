"""The queue's order: heaviest expected run time first (harness.sweep.cost), from the cell's cost, the sweep's
own observed durations, and earlier attempts of the same cell; ties in queue order."""
from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from harness.sweep.cost import SECONDS, Attempt, cell_cost, expected_seconds, fit, model_for, predict
from harness.sweep.ledger import Ledger, open_storage
from harness.sweep.spec import load_spec, make_plan


def _ledger(tmp_path: Path, costs: dict[str, float]) -> Ledger:
    ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), "unit/proxy", create=True)
    for cell, cost in costs.items():
        ledger.enqueue(cell, {"cell": cell}, {}, cost, attempt=1)
    return ledger


def _pop(ledger: Ledger, tmp_path: Path) -> str:
    t = ledger.pop("w", lambda t: tmp_path / "x.log")
    return t.user_attrs["harness.cell"]


def test_cells_are_handed_out_heaviest_first_ties_in_queue_order(tmp_path):
    ledger = _ledger(tmp_path, {"light": 10.0, "heavy": 500.0, "mid-a": 100.0, "mid-b": 100.0})
    assert [_pop(ledger, tmp_path) for _ in range(4)] == ["heavy", "mid-a", "mid-b", "light"]


def test_an_earlier_attempts_observed_time_outranks_the_model(tmp_path):
    """A cell that timed out after 900 s once is not a 10-unit cell: it goes first when it comes back."""
    ledger = _ledger(tmp_path, {"slow": 10.0, "big": 200.0})
    t = ledger.pop("w", lambda t: tmp_path / "x.log")
    assert t.user_attrs["harness.cell"] == "big"
    t2 = ledger.pop("w", lambda t: tmp_path / "x.log")
    ledger.requeue("slow", settling=t2, failed=True)
    ledger.settle(t2._trial_id, TrialState.FAIL, {"state": "timeout", "duration_s": 900.0})
    ledger.enqueue("other", {"cell": "other"}, {}, 300.0, attempt=1)
    assert predict(300.0, SECONDS["proxy"]) < 900.0  # the model's guess for "other" is below what "slow" ran
    assert _pop(ledger, tmp_path) == "slow"
    assert _pop(ledger, tmp_path) == "other"


def test_fit_follows_the_machine_and_refuses_what_it_cannot_fit():
    done = [Attempt("a", 100.0, 15.0, True), Attempt("b", 300.0, 35.0, True), Attempt("c", 999.0, 1.0, False)]
    assert fit(done) == pytest.approx((5.0, 0.1))  # unfinished attempts are not samples of the model
    assert fit(done[:1]) is None  # one cost: no slope
    assert fit([Attempt("a", 100.0, 40.0, True), Attempt("b", 110.0, 30.0, True)]) is None  # negative slope
    assert expected_seconds("x", 200.0, done, model_for(done, "proxy")) == pytest.approx(25.0)
    assert expected_seconds("x", 200.0, [], model_for([], "paper")) == 200.0  # no model: cost units, order only
    assert expected_seconds("c", 200.0, done, model_for(done, "proxy")) == pytest.approx(25.0)  # 1 s crash: a floor


def test_cost_counts_passes_not_steps():
    """(1, 8) does 8 full passes over each rollout batch, as (8, 8) does; (8, 1) does one, in 8 smaller steps."""
    assert cell_cost(30, 8, 8) > cell_cost(30, 1, 8) > 4 * cell_cost(30, 8, 1) / 2
    assert cell_cost(30, 1, 8) / cell_cost(30, 8, 8) > 0.8
    assert cell_cost(60, 2, 2) == 2 * cell_cost(30, 2, 2)


def test_plan_order_is_the_queue_order():
    plan = make_plan(*load_spec("grpo-vs-cfpo"), "proxy", [])
    keys = [(-c.cost, c.axes["seed"]) for c in plan.cells]
    assert keys == sorted(keys)
    first = plan.cells[:2]  # the two objectives of the heaviest cell of the first seed, side by side
    assert {c.axes["objective"] for c in first} == {"grpo", "cfpo"} and {c.axes["seed"] for c in first} == {0}
