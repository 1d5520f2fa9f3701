"""The queue's order: heaviest expected run time first (harness.sweep.cost), from the cell's cost, the sweep's
own observed durations, the scale's reference costs (recorded in the ledger), and earlier attempts of the same
cell; ties in queue order."""
from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from harness.sweep.cost import (
    PROXY_REFERENCE_S,
    Attempt,
    cell_cost,
    expected_seconds,
    fit,
    model_for,
    predict,
)
from harness.sweep.ledger import SCALE, Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage


def _ledger(tmp_path: Path, costs: dict[str, float], name: str = "unit/proxy",
            scale: dict | None = None) -> Ledger:
    ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), name, create=True, scale=scale)
    for cell, cost in costs.items():
        ledger.enqueue(cell, {"cell": cell}, {}, cost, attempt=1)
    return ledger


def _pop(ledger: Ledger, tmp_path: Path) -> str:
    t = ledger.pop("w", lambda t: tmp_path / "x.log")
    return t.user_attrs["harness.cell"]


def test_cells_are_handed_out_heaviest_first_ties_in_queue_order(tmp_path):
    ledger = _ledger(tmp_path, {"light": 10.0, "heavy": 500.0, "mid-a": 100.0, "mid-b": 100.0})
    assert [_pop(ledger, tmp_path) for _ in range(4)] == ["heavy", "mid-a", "mid-b", "light"]


def _slow_comes_back(ledger: Ledger, tmp_path: Path) -> list[str]:
    """"slow" (10 units) timed out after 900 s and is queued again beside "other" (300 units): pop both."""
    t = ledger.pop("w", lambda t: tmp_path / "x.log")
    assert t.user_attrs["harness.cell"] == "big"
    t2 = ledger.pop("w", lambda t: tmp_path / "x.log")
    ledger.requeue("slow", settling=t2, failed=True)
    ledger.settle(t2._trial_id, TrialState.FAIL, {"state": "timeout", "duration_s": 900.0})
    ledger.enqueue("other", {"cell": "other"}, {}, 300.0, attempt=1)
    return [_pop(ledger, tmp_path), _pop(ledger, tmp_path)]


def test_an_earlier_attempts_observed_time_outranks_the_model(tmp_path):
    """A cell that timed out after 900 s once is not a 10-unit cell: it goes first when it comes back."""
    ledger = _ledger(tmp_path, {"slow": 10.0, "big": 200.0})
    assert predict(300.0, PROXY_REFERENCE_S) < 900.0  # the model's guess for "other" is below what "slow" ran
    assert _slow_comes_back(ledger, tmp_path) == ["slow", "other"]


@pytest.mark.parametrize("reference,order", [([3.0, 0.505], ["slow", "other"]), (None, ["other", "slow"])])
def test_the_queue_reads_the_scale_from_the_ledger(tmp_path, reference, order):
    """The scale's reference costs come from the ledger's SCALE attr, whatever the study is called: with
    them, observed seconds count; without (none measured), the order is by cost units alone."""
    scale = {"name": "gpu-lite", "device": "cuda", "reference_s": reference}
    ledger = _ledger(tmp_path, {"slow": 10.0, "big": 200.0}, name="unit/proxy", scale=scale)
    reader = Ledger(open_storage(str(tmp_path / "ledger.journal")), "unit/proxy", create=False)
    assert reader.attr(SCALE) == scale and reader.scale == "gpu-lite"
    assert reader.reference_s == (tuple(reference) if reference else None)
    assert _slow_comes_back(ledger, tmp_path) == order


def test_a_ledger_without_a_recorded_scale_falls_back_to_its_study_name(tmp_path):
    plan = make_plan(*load_spec("grpo-vs-cfpo"), "proxy-full", [])
    for name, reference in (("unit/proxy", PROXY_REFERENCE_S), ("unit/paper", None), ("unit/other", None)):
        ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), name, create=True)
        assert ledger.scale == name.split("/")[1] and ledger.reference_s == reference
    recorded = Ledger(open_storage(str(tmp_path / "ledger.journal")), "unit/x", create=True,
                      scale=plan.ledger_scale())
    assert recorded.scale == "proxy-full" and recorded.reference_s == plan.reference_s == PROXY_REFERENCE_S


def test_fit_follows_the_machine_and_refuses_what_it_cannot_fit():
    done = [Attempt("a", 100.0, 15.0, True), Attempt("b", 300.0, 35.0, True), Attempt("c", 999.0, 1.0, False)]
    assert fit(done) == pytest.approx((5.0, 0.1))  # unfinished attempts are not samples of the model
    assert fit(done[:1]) is None  # one cost: no slope
    assert fit([Attempt("a", 100.0, 40.0, True), Attempt("b", 110.0, 30.0, True)]) is None  # negative slope
    assert expected_seconds("x", 200.0, done, model_for(done, PROXY_REFERENCE_S)) == pytest.approx(25.0)
    assert model_for([], PROXY_REFERENCE_S) == PROXY_REFERENCE_S  # no fit yet: the reference machine's
    assert expected_seconds("x", 200.0, [], model_for([], None)) == 200.0  # no model: cost units, order only
    # a 1 s crash is only a floor
    assert expected_seconds("c", 200.0, done, model_for(done, PROXY_REFERENCE_S)) == pytest.approx(25.0)


def test_cost_counts_passes_not_steps():
    """(1, 8) does 8 full passes over each rollout batch, as (8, 8) does; (8, 1) does one, in 8 smaller
    steps."""
    assert cell_cost(30, 8, 8) > cell_cost(30, 1, 8) > 4 * cell_cost(30, 8, 1) / 2
    assert cell_cost(30, 1, 8) / cell_cost(30, 8, 8) > 0.8
    assert cell_cost(60, 2, 2) == 2 * cell_cost(30, 2, 2)


def test_plan_order_is_the_queue_order():
    plan = make_plan(*load_spec("grpo-vs-cfpo"), "proxy-full", [])
    keys = [(-c.cost, c.axes["seed"]) for c in plan.cells]
    assert keys == sorted(keys)
    first = plan.cells[:2]  # the two objectives of the heaviest cell of the first seed, side by side
    assert {c.axes["objective"] for c in first} == {"grpo", "cfpo"} and {c.axes["seed"] for c in first} == {0}
