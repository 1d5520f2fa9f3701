"""Sweep spec: grid enumeration, cell identity, scales and --set, and bad specs (exit 2, nothing written)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import ConfigError, build_config, config_hash
from harness.sweep.spec import load_spec, make_plan, pick_scale

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "study": "tiny",
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": [0, 1],
    "scales": {"paper": {"base": {"rollout_batches": 50, "model": "some/hub-model", "task": "gsm8k"}},
               "proxy": {"base": {"rollout_batches": 2}, "axes": {"iterations": [1, 2]}, "seeds": [0]}},
}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_repo_spec_proxy_grid():
    spec, path = load_spec("grpo-vs-cfpo")
    plan = make_plan(spec, path, "proxy")
    assert plan.experiment == "grpo-vs-cfpo/proxy"
    assert len(plan.cells) == 2 * 2 * 2 * 3  # objective x batch_ratio [1,4] x iterations [1,4] x 3 seeds
    assert {c.config.rollout_batches for c in plan.cells} == {30}  # one budget: cells differ only in reuse
    assert all(c.config.experiment == "grpo-vs-cfpo/proxy" for c in plan.cells)
    # The paper scale has the full 4x4 grid for both objectives and three seeds.
    assert spec.scales.paper.base["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    from harness.tasks import TASKS

    if "gsm8k" in TASKS:
        paper = make_plan(spec, path, "paper")
        assert len(paper.cells) == 2 * 4 * 4 * 3 and {c.config.rollout_batches for c in paper.cells} == {200}


def test_grid_hashes_are_config_hashes(tmp_path):
    spec, path = load_spec(str(write_spec(tmp_path, TINY)))
    plan = make_plan(spec, path, "proxy")
    assert len(plan.cells) == 2 * 2 * 2  # objective x batch_ratio x iterations (scale axis added), seed [0]
    assert len({c.hash for c in plan.cells}) == len(plan.cells)
    for c in plan.cells:
        assert c.hash == config_hash(build_config(c.config.model_dump()))
        assert {k: getattr(c.config, k) for k in ("objective", "batch_ratio", "iterations", "seed")} == c.axes
    # Longest cells first (within a seed): more reuse, more optimizer steps.
    costs = [c.cost for c in plan.cells]
    assert costs == sorted(costs, reverse=True)
    # Identity does not depend on where results go or on the experiment name, and is stable across loads.
    again = make_plan(*load_spec(str(path)), "proxy")
    assert [c.hash for c in again.cells] == [c.hash for c in plan.cells]


def test_set_narrows_axes_and_overrides_base(tmp_path):
    spec, path = load_spec(str(write_spec(tmp_path, TINY)))
    full = {c.hash for c in make_plan(spec, path, "proxy").cells}
    plan = make_plan(spec, path, "proxy", ["batch_ratio=1", "iterations=[1]"])
    assert len(plan.cells) == 2 and {c.hash for c in plan.cells} <= full  # a sub-grid keeps identities
    plan = make_plan(spec, path, "proxy", ["rollout_batches=3", "trl.learning_rate=1e-5", "seed=[4,5]"])
    assert {c.config.rollout_batches for c in plan.cells} == {3}
    assert {c.config.trl["learning_rate"] for c in plan.cells} == {1e-5}
    assert {c.axes["seed"] for c in plan.cells} == {4, 5}


def test_scale_auto(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_scale("auto")[0] == "proxy"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_scale("auto")[0] == "paper"
    assert pick_scale("proxy")[0] == "proxy"


def _bad(spec: dict, **edits) -> dict:
    out = yaml.safe_load(yaml.safe_dump(spec))
    for dotted, value in edits.items():
        node = out
        *parents, leaf = dotted.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return out


BAD = [
    ("unknown top-level key", _bad(TINY, colour="red"), "colour: unknown field"),
    ("unknown scale", _bad(TINY, **{"scales/huge": {}}), "scales.huge: unknown field"),
    ("unknown job field in base", _bad(TINY, **{"base/learning_rate": 1e-5}), "base.learning_rate: not a job field"),
    ("unknown proxy field", _bad(TINY, **{"base/proxy": {"width": 3}}), "base.proxy.width: not a proxy field"),
    ("unknown axis", _bad(TINY, **{"axes/batch_rato": [1]}), "axes.batch_rato: not a job field"),
    ("axis not a list", _bad(TINY, **{"axes/batch_ratio": 4}), "axes.batch_ratio: Input should be a valid list"),
    ("empty axis", _bad(TINY, **{"axes/batch_ratio": []}), "axes.batch_ratio: needs at least one value"),
    ("duplicate axis value", _bad(TINY, **{"axes/batch_ratio": [1, 2, 1]}), "axes.batch_ratio: duplicate value 1"),
    ("duplicate seed", _bad(TINY, seeds=[0, 0]), "seeds: duplicate value 0"),
    ("seed as a string", _bad(TINY, seeds=["a"]), "seeds.0"),
    ("budget as an axis", _bad(TINY, **{"axes/rollout_batches": [1, 2]}), "axes.rollout_batches: cannot be an axis"),
    ("managed field", _bad(TINY, **{"base/output_dir": "x"}), "base.output_dir: set by the sweep"),
    ("no budget", _bad(TINY, **{"scales/proxy/base": {}}), "rollout_batches: required"),
    ("wrong type", _bad(TINY, **{"axes/batch_ratio": [1, "two"]}), "batch_ratio: Input should be a valid integer"),
    ("impossible combination", _bad(TINY, **{"axes/batch_ratio": [1, 3]}),
     "generation_batch_size=16 must be divisible by batch_ratio=3"),
    ("unknown objective", _bad(TINY, **{"axes/objective": ["grpo", "ppo"]}), "objective: unknown objective 'ppo'"),
    ("not a GRPOConfig knob", _bad(TINY, **{"base/trl/lr": 1}), "trl.lr is not a GRPOConfig field"),
    ("joined axis, wrong width", _bad(TINY, **{"axes/batch_ratio+iterations": [[1, 1], [2]]}),
     "axes.batch_ratio+iterations: values must be lists of 2 scalars, one per joined field"),
    ("joined axis, unknown field", _bad(TINY, **{"axes/batch_ratio+iteration": [[1, 1]]}),
     "axes.batch_ratio+iteration: not a job field"),
    ("joined axis, duplicate point", _bad(TINY, **{"axes/batch_ratio+iterations": [[1, 1], [1, 1]]}),
     "axes.batch_ratio+iterations: duplicate value"),
    ("knob the objective does not use", _bad(TINY, **{"axes/objective": ["grpo", "pg-is"], "base/trl/epsilon": 0.2}),
     "trl.epsilon is not used by objective 'pg-is'; its knobs: none"),
    ("hypothesis: unknown measure", _bad(TINY, **{"hypothesis/measure": "gain_val"}), "hypothesis.measure: Input"),
    ("hypothesis: baseline not an objective", _bad(TINY, **{"hypothesis/baseline": "ppo"}),
     "hypothesis.baseline 'ppo' is not an objective of this sweep; allowed: grpo"),
    ("hypothesis: alpha out of range", _bad(TINY, **{"hypothesis/alpha": 0.5}), "hypothesis.alpha: Input should be less"),
    ("hypothesis: unknown field", _bad(TINY, **{"hypothesis/primary": "auc"}), "hypothesis.primary: unknown field"),
]


@pytest.mark.parametrize("case,spec,message", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, case, spec, message):
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{results}/mlflow.db")
    path = write_spec(tmp_path, spec)
    assert main(["sweep", str(path), "--scale", "proxy", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not results.exists()


def test_other_scale_is_validated_too(tmp_path, monkeypatch, capsys):
    """--scale proxy still refuses a spec whose paper grid is impossible; an unregistered task only warns."""
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    broken = _bad(TINY, **{"scales/paper/axes": {"batch_ratio": [1, 3]}})
    assert main(["sweep", str(write_spec(tmp_path, broken)), "--scale", "proxy"]) == 2
    assert "scales.paper: cell" in capsys.readouterr().err and not results.exists()
    spec, path = load_spec(str(write_spec(tmp_path, _bad(TINY, **{"scales/paper/base/task": "no-such-task"}))))
    from harness.sweep.spec import check_other_scales

    (warning,) = check_other_scales(spec, path, "proxy")
    assert "unknown task 'no-such-task'" in warning


@pytest.mark.parametrize("argv,message", [
    (["--set", "nope=1"], "--set nope: not a job field"),
    (["--set", "batch_ratio=[]"], "--set batch_ratio: needs at least one value"),
    (["--set", "generation_batch_size=10"], "must be divisible"),
    (["--max-attempts", "0"], "--max-attempts 0"),
    (["--storage", "sqlite:///x.db"], "SQLite storage"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    path = write_spec(tmp_path, TINY)
    assert main(["sweep", str(path), "--scale", "proxy", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not results.exists()


def test_not_yaml_and_missing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("study: [unclosed\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(str(bad))
    assert main(["sweep", "no-such-sweep", "--scale", "proxy"]) == 2
    assert "no such sweep" in capsys.readouterr().err


def test_status_and_worker_need_an_existing_ledger(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    path = write_spec(tmp_path, TINY)
    for cmd in ("status", "worker"):
        assert main([cmd, str(path), "--scale", "proxy"]) == 2
        assert "no ledger" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_any_job_field_is_an_axis(tmp_path):
    """The README's ablation: does CFPO's stability lean on gradient clipping? One more axis, a spec edit."""
    spec = {**TINY, "scales": {**TINY["scales"], "proxy": {"base": {"rollout_batches": 2}, "seeds": [0],
                                                            "axes": {"trl.max_grad_norm": [1.0, 0.0]}}}}
    path = write_spec(tmp_path, spec)
    plan = make_plan(*load_spec(str(path)), "proxy")
    assert len(plan.cells) == 2 * 2 * 2
    assert {c.config.trl["max_grad_norm"] for c in plan.cells} == {1.0, 0.0}
    assert {c.axes["trl.max_grad_norm"] for c in plan.cells} == {1.0, 0.0}


def test_repo_proxy_scale_uses_the_calibrated_proxy_config():
    """configs/proxy.yaml holds the calibrated proxy (docs/CALIBRATION.md); the sweep's proxy scale must build
    the same warm-started model and train with the same knobs, so the two never drift apart silently."""
    from harness.config import load_config

    calibrated = load_config(REPO / "configs" / "proxy.yaml")
    plan = make_plan(*load_spec("grpo-vs-cfpo"), "proxy")
    for cell in plan.cells:
        assert cell.config.proxy == calibrated.proxy
        assert cell.config.task == calibrated.task and cell.config.generation_batch_size == 64
        for knob, value in calibrated.trl.items():
            assert cell.config.trl[knob] == value, knob


@pytest.mark.parametrize("spec_file", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_repo_spec_is_valid_at_every_scale_it_defines(spec_file):
    spec, path = load_spec(str(REPO / "sweeps" / spec_file))
    assert {"proxy", "paper"} <= set(spec.scales.defined())
    for scale in spec.scales.defined():
        assert make_plan(spec, path, scale).cells


def test_full_grid_scale_is_the_papers_grid_at_the_proxy_budget(tmp_path, monkeypatch, capsys):
    """grpo-vs-cfpo's optional proxy-full scale: {grpo, cfpo} x batch ratio {1,2,4,8} x iterations {1,2,4,8} x 3
    seeds on the proxy's model, task and budget; a sweep without that scale refuses it (exit 2)."""
    spec, path = load_spec("grpo-vs-cfpo")
    full, quick = make_plan(spec, path, "proxy-full"), make_plan(spec, path, "proxy")
    assert len(full.cells) == 96 and full.experiment == "grpo-vs-cfpo/proxy-full"
    assert {(c.axes["batch_ratio"], c.axes["iterations"]) for c in full.cells} == {
        (b, i) for b in (1, 2, 4, 8) for i in (1, 2, 4, 8)}
    q = quick.cells[0].config
    for c in full.cells:
        assert (c.config.proxy, c.config.task, c.config.rollout_batches) == (q.proxy, q.task, q.rollout_batches)
        assert c.config.eval_every == q.eval_every and c.config.val_prompts == q.val_prompts
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    assert main(["sweep", "cfpo-grad-clip", "--scale", "proxy-full", "--dry-run"]) == 2
    assert "scales.proxy-full: not defined in this sweep; allowed: paper, proxy" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_joined_axis_is_a_ladder_not_a_product(tmp_path):
    """`batch_ratio+iterations: [[1, 1], [2, 2]]`: the two fields move together (2 points, not 4); --set narrows
    the ladder to one rung and keeps the cells' identities."""
    spec = {**TINY, "axes": {"objective": ["grpo", "cfpo"], "batch_ratio+iterations": [[1, 1], [2, 2]]}}
    spec["scales"] = {**TINY["scales"], "proxy": {"base": {"rollout_batches": 2}, "seeds": [0]}}
    path = write_spec(tmp_path, spec)
    plan = make_plan(*load_spec(str(path)), "proxy")
    assert sorted((c.axes["objective"], c.axes["batch_ratio"], c.axes["iterations"]) for c in plan.cells) == [
        ("cfpo", 1, 1), ("cfpo", 2, 2), ("grpo", 1, 1), ("grpo", 2, 2)]
    assert all((c.config.batch_ratio, c.config.iterations) == (c.axes["batch_ratio"], c.axes["iterations"])
               for c in plan.cells)
    rung = make_plan(*load_spec(str(path)), "proxy", ["batch_ratio+iterations=[2, 2]"])
    assert {c.hash for c in rung.cells} == {c.hash for c in plan.cells if c.axes["batch_ratio"] == 2}


def test_dry_run_prints_cells_knobs_and_estimate_and_writes_nothing(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{results}/mlflow.db")
    monkeypatch.setenv("COLUMNS", "300")
    spec = {**TINY, "axes": {"objective": ["clip-higher", "cfpo"], "batch_ratio": [1, 2]}}
    path = write_spec(tmp_path, spec)
    assert main(["sweep", str(path), "--scale", "proxy", "--workers", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = make_plan(*load_spec(str(path)), "proxy")
    assert all(c.hash in out for c in plan.cells) and "epsilon=0.2 epsilon_high=0.28" in out
    assert "steps_per_generation" in out and "gradient_accumulation_steps" in out
    assert "wall with 3 worker(s)" in out and "nothing written" in out
    assert not results.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
    # Bad input is refused the same way with or without --dry-run.
    bad = write_spec(tmp_path, _bad(spec, **{"axes/batch_ratio": [1, 3]}), "bad.yaml")
    assert main(["sweep", str(bad), "--scale", "proxy", "--dry-run"]) == 2
    assert "must be divisible by batch_ratio=3" in capsys.readouterr().err


def test_makespan_and_utilisation():
    from datetime import datetime, timedelta

    from harness.sweep.estimate import makespan, utilisation

    assert makespan([4, 3, 3, 2], 2) == 6  # heaviest first: (4, 2) and (3, 3)
    assert makespan([2, 3, 3, 4], 2) == 7  # lightest first leaves a worker idle at the end
    assert makespan([5], 4) == 5 and makespan([], 2) == 0
    t0 = datetime(2026, 1, 1)
    at = lambda s: t0 + timedelta(seconds=s)  # noqa: E731
    # Two workers over 10 s: one busy 0-10, the other 0-4 and 6-10 (plus an attempt from before, clipped).
    spans = [(at(0), at(10)), (at(0), at(4)), (at(6), None), (at(-50), at(-40)), (None, None)]
    assert utilisation(spans, t0, at(10), 2) == pytest.approx(18 / 20)
    assert utilisation(spans, t0, at(10), 0) is None
