"""Sweep spec: grid enumeration, cell identity, scales and --set, and bad specs (exit 2, nothing written)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import ConfigError, JobConfig, build_config, config_hash
from harness.sweep.scale_choice import pick_scale
from harness.sweep.spec import load_spec, make_plan

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


def test_repo_spec_proxy_is_the_confirmation_of_proxy_full():
    spec, path = load_spec("grpo-vs-cfpo")
    plan = make_plan(spec, path, "proxy")
    assert plan.experiment == "grpo-vs-cfpo/proxy" and plan.confirms == "proxy-full"
    cells = {(c.axes["objective"], c.config.batch_ratio, c.config.iterations, c.axes["seed"]) for c in plan.cells}
    # the contrast cell on 10 fresh seeds, the on-policy control on 2
    assert cells == ({(o, 4, 8, s) for o in ("grpo", "cfpo") for s in range(100, 110)}
                     | {(o, 1, 1, s) for o in ("grpo", "cfpo") for s in (100, 101)})
    assert {c.config.rollout_batches for c in plan.cells} == {25}  # one budget: cells differ only in reuse
    assert plan.hypothesis.cells == [(4, 8)] and spec.hypothesis.cells == "off-policy"
    assert all(c.config.experiment == "grpo-vs-cfpo/proxy" for c in plan.cells)
    # the contrast cell is the exploration's job but for its seed and budget
    full = {(c.config.batch_ratio, c.config.iterations, c.config.objective): c.config
            for c in make_plan(spec, path, "proxy-full").cells if c.axes["seed"] == 0}
    for c in plan.cells:
        other = full[(c.config.batch_ratio, c.config.iterations, c.config.objective)]
        assert c.config.model_dump(exclude={"seed", "rollout_batches", "experiment"}) == \
            other.model_dump(exclude={"seed", "rollout_batches", "experiment"})
    # The paper scale has the full 4x4 grid for both objectives and three seeds, on GPUs.
    assert spec.scales["paper"].device == "cuda" and plan.device == "cpu"
    from harness.tasks import TASKS

    if "gsm8k" in TASKS:
        paper = make_plan(spec, path, "paper")
        assert len(paper.cells) == 2 * 4 * 4 * 3 and {c.config.rollout_batches for c in paper.cells} == {200}
        assert {c.config.model for c in paper.cells} == {"Qwen/Qwen2.5-0.5B-Instruct"}


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


@pytest.mark.parametrize("spec_file", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_scale_auto_is_the_first_scale_whose_device_is_here(monkeypatch, spec_file):
    """Every repo sweep: paper on a CUDA machine, proxy without; a spec whose first scale is cpu runs it."""
    import torch

    spec, path = load_spec(str(REPO / "sweeps" / spec_file))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_scale(spec, path, "auto")[0] == "proxy"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_scale(spec, path, "auto")[0] == "paper"
    assert pick_scale(spec, path, "proxy")[0] == "proxy"
    proxy, paper = spec.scales["proxy"], spec.scales["paper"]
    cpu_first = spec.model_copy(update={"scales": {"proxy": proxy, "paper": paper}})
    assert pick_scale(cpu_first, path, "auto") == ("proxy", "auto: the sweep file's first scale")
    only_gpu = spec.model_copy(update={"scales": {"paper": paper}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="scales: every scale has device: cuda"):
        pick_scale(only_gpu, path, "auto")


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
    ("unknown scale field", _bad(TINY, **{"scales/proxy/colour": "red"}),
     "scales.proxy.colour: unknown field"),
    ("scale named auto", _bad(TINY, **{"scales/auto": {}}), "scales: scale name 'auto': allowed:"),
    ("scale name not a folder name", _bad(TINY, **{"scales/a b": {}}), "scales: scale name 'a b': allowed:"),
    ("no scales", _bad(TINY, scales={}), "scales: needs at least one scale"),
    ("unknown device", _bad(TINY, **{"scales/proxy/device": "tpu"}),
     "scales.proxy.device: Input should be 'cpu' or 'cuda'"),
    ("negative reference costs", _bad(TINY, **{"scales/proxy/reference_s": [-1, 1]}),
     "scales.proxy.reference_s.0: Input should be greater than or equal to 0"),
    ("a scale without a budget", _bad(TINY, **{"scales/huge": {}}),
     "scales.huge.base.rollout_batches: required"),
    ("unknown job field in base", _bad(TINY, **{"base/learning_rate": 1e-5}),
     "base.learning_rate: not a job field"),
    ("unknown proxy field", _bad(TINY, **{"base/proxy": {"width": 3}}),
     "base.proxy.width: not a proxy field"),
    ("unknown axis", _bad(TINY, **{"axes/batch_rato": [1]}), "axes.batch_rato: not a job field"),
    ("axis not a list", _bad(TINY, **{"axes/batch_ratio": 4}),
     "axes.batch_ratio: Input should be a valid list"),
    ("empty axis", _bad(TINY, **{"axes/batch_ratio": []}), "axes.batch_ratio: needs at least one value"),
    ("duplicate axis value", _bad(TINY, **{"axes/batch_ratio": [1, 2, 1]}),
     "axes.batch_ratio: duplicate value 1"),
    ("duplicate seed", _bad(TINY, seeds=[0, 0]), "seeds: duplicate value 0"),
    ("seed as a string", _bad(TINY, seeds=["a"]), "seeds.0"),
    ("budget as an axis", _bad(TINY, **{"axes/rollout_batches": [1, 2]}),
     "axes.rollout_batches: cannot be an axis"),
    ("managed field", _bad(TINY, **{"base/output_dir": "x"}), "base.output_dir: set by the sweep"),
    ("no budget", _bad(TINY, **{"scales/proxy/base": {}}), "rollout_batches: required"),
    ("wrong type", _bad(TINY, **{"axes/batch_ratio": [1, "two"]}),
     "batch_ratio: Input should be a valid integer"),
    ("impossible combination", _bad(TINY, **{"axes/batch_ratio": [1, 3]}),
     "generation_batch_size=16 must be divisible by batch_ratio=3"),
    ("unknown objective", _bad(TINY, **{"axes/objective": ["grpo", "ppo"]}),
     "objective: unknown objective 'ppo'"),
    ("not a GRPOConfig knob", _bad(TINY, **{"base/trl/lr": 1}), "trl.lr is not a GRPOConfig field"),
    ("joined axis, wrong width", _bad(TINY, **{"axes/batch_ratio+iterations": [[1, 1], [2]]}),
     "axes.batch_ratio+iterations: values must be lists of 2 scalars, one per joined field"),
    ("joined axis, unknown field", _bad(TINY, **{"axes/batch_ratio+iteration": [[1, 1]]}),
     "axes.batch_ratio+iteration: not a job field"),
    ("joined axis, duplicate point", _bad(TINY, **{"axes/batch_ratio+iterations": [[1, 1], [1, 1]]}),
     "axes.batch_ratio+iterations: duplicate value"),
    ("knob the objective does not use",
     _bad(TINY, **{"axes/objective": ["grpo", "pg-is"], "base/trl/epsilon": 0.2}),
     "trl.epsilon is not used by objective 'pg-is'; its knobs: none"),
    ("hypothesis: unknown measure", _bad(TINY, **{"hypothesis/measure": "gain_val"}),
     "hypothesis.measure: Input"),
    ("hypothesis: baseline not an objective", _bad(TINY, **{"hypothesis/baseline": "ppo"}),
     "hypothesis.baseline 'ppo' is not an objective of this sweep; allowed: grpo"),
    ("hypothesis: alpha out of range", _bad(TINY, **{"hypothesis/alpha": 0.5}),
     "hypothesis.alpha: Input should be less"),
    ("hypothesis: unknown field", _bad(TINY, **{"hypothesis/primary": "auc"}),
     "hypothesis.primary: unknown field"),
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
    unregistered = _bad(TINY, **{"scales/paper/base/task": "no-such-task"})
    spec, path = load_spec(str(write_spec(tmp_path, unregistered)))
    from harness.sweep.scale_choice import check_other_scales

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
            if knob != "per_device_train_batch_size":  # the micro-batch (8, as in proxy-full); batch_ratio sets
                assert cell.config.trl[knob] == value, knob  # the optimizer batch


@pytest.mark.parametrize("spec_file", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_repo_spec_is_valid_at_every_scale_it_defines(spec_file):
    spec, path = load_spec(str(REPO / "sweeps" / spec_file))
    assert {"proxy", "paper"} <= set(spec.scales)
    for scale in spec.scales:
        assert make_plan(spec, path, scale).cells


def test_full_grid_scale_is_the_papers_grid_at_the_proxy_budget(tmp_path, monkeypatch, capsys):
    """grpo-vs-cfpo's optional proxy-full scale: {grpo, cfpo} x batch ratio {1,2,4,8} x iterations {1,2,4,8}
    x 3 seeds on the proxy's model, task and budget; a sweep without that scale refuses it (exit 2)."""
    spec, path = load_spec("grpo-vs-cfpo")
    full, quick = make_plan(spec, path, "proxy-full"), make_plan(spec, path, "proxy")
    assert len(full.cells) == 96 and full.experiment == "grpo-vs-cfpo/proxy-full"
    assert {(c.axes["batch_ratio"], c.axes["iterations"]) for c in full.cells} == {
        (b, i) for b in (1, 2, 4, 8) for i in (1, 2, 4, 8)}
    q = quick.cells[0].config
    for c in full.cells:
        assert (c.config.proxy, c.config.task, c.config.trl) == (q.proxy, q.task, q.trl)
        assert c.config.rollout_batches == 30 and q.rollout_batches == 25  # the confirmation: a prefix
        assert c.config.eval_every == q.eval_every and c.config.val_prompts == q.val_prompts
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    assert main(["sweep", "cfpo-grad-clip", "--scale", "proxy-full", "--dry-run"]) == 2
    assert "scales.proxy-full: not defined in this sweep; allowed: paper, proxy" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_joined_axis_is_a_ladder_not_a_product(tmp_path):
    """`batch_ratio+iterations: [[1, 1], [2, 2]]`: the two fields move together (2 points, not 4); --set
    narrows the ladder to one rung and keeps the cells' identities."""
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


# ------------------------------------------------------------------------------ scales as data, extends
def test_a_scale_defined_only_in_yaml_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """A new scale is one block of YAML: its device, limits and reference costs reach the plan, the dry run
    and `--scale auto`; its name is any folder name."""
    import torch

    spec = {**TINY, "scales": {**TINY["scales"], "gpu-lite": {
        "description": "a short GPU check", "device": "cuda", "base": {"rollout_batches": 3},
        "seeds": [7], "cell_timeout_min": 10, "reference_s": [1.0, 0.1]}}}
    path = write_spec(tmp_path, spec)
    loaded, _ = load_spec(str(path))
    plan = make_plan(loaded, path, "gpu-lite")
    assert plan.experiment == "tiny/gpu-lite" and plan.device == "cuda" and len(plan.cells) == 2 * 2
    assert {c.config.rollout_batches for c in plan.cells} == {3}
    assert {c.axes["seed"] for c in plan.cells} == {7}
    assert plan.cell_timeout_s == 600 and plan.stall_timeout_s == 120 * 60  # left out: the cuda default
    assert plan.reference_s == (1.0, 0.1)
    assert plan.ledger_scale() == {"name": "gpu-lite", "device": "cuda", "reference_s": [1.0, 0.1]}
    # Left out entirely: the cpu defaults (what the repo's proxy scales run with).
    proxy = make_plan(loaded, path, "proxy")
    assert (proxy.device, proxy.cell_timeout_s, proxy.stall_timeout_s, proxy.reference_s) == (
        "cpu", 6 * 3600, 30 * 60, (3.0, 0.505))
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["sweep", str(path), "--scale", "gpu-lite", "--workers", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "scale: gpu-lite (asked for)" in out and all(c.hash in out for c in plan.cells)
    assert "wall with 2 worker(s)" in out and not (tmp_path / "results").exists()
    # First in the file among those whose device is here: TINY's paper and proxy are cpu scales.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_first = {**spec, "scales": {"gpu-lite": spec["scales"]["gpu-lite"], **TINY["scales"]}}
    first = write_spec(tmp_path, gpu_first, "gpu-first.yaml")
    assert pick_scale(*load_spec(str(first)), "auto")[0] == "paper"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_scale(*load_spec(str(first)), "auto")[0] == "gpu-lite"


@pytest.mark.parametrize("argv", [["sweep", "--dry-run"], ["sweep"], ["status"], ["worker"]])
def test_unknown_scale_exits_2_with_one_line_naming_the_allowed_ones(tmp_path, monkeypatch, capsys, argv):
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    path = write_spec(tmp_path, TINY)
    assert main([argv[0], str(path), "--scale", "huge", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{path}: scales.huge: not defined in this sweep; allowed: paper, proxy" in err
    assert not results.exists()


def test_unknown_scale_in_the_dashboard_exits_2(tmp_path, monkeypatch, capsys):
    from harness.ui import main as ui_main

    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    path = write_spec(tmp_path, TINY)
    assert ui_main(["dashboard", str(path), "--scale", "huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "scales.huge: not defined in this sweep; allowed: paper, proxy" in err


@pytest.mark.parametrize("where", ["scales/proxy/extends", "extends"])
def test_extends_a_missing_file_exits_2(tmp_path, monkeypatch, capsys, where):
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    path = write_spec(tmp_path, _bad(TINY, **{where: "../configs/nope.yaml"}))
    assert main(["sweep", str(path), "--scale", "proxy", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    field = where.replace("/", ".")
    assert len(err.splitlines()) == 1, err
    assert f"{path}: {field}: ../configs/nope.yaml: no such file; allowed: a job config path relative" in err
    assert not results.exists()


@pytest.mark.parametrize("config,message", [
    ("learning_rate: 1.0e-5\n", "learning_rate: not a job field"),
    ("trl.learning_rate: 1.0e-5\n", "trl.learning_rate: not a job field; allowed: nested sections"),
    ("- 1\n", "top level must be a mapping"),
    ("objective: [unclosed\n", "not valid YAML"),
])
def test_extends_a_bad_job_config_exits_2(tmp_path, monkeypatch, capsys, config, message):
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    (tmp_path / "job.yaml").write_text(config)
    path = write_spec(tmp_path, _bad(TINY, **{"scales/proxy/extends": "job.yaml"}))
    assert main(["sweep", str(path), "--scale", "proxy", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: scales.proxy.extends: job.yaml: {message}" in err, err


def test_extends_is_the_starting_point_and_the_sweep_merges_over_it(tmp_path):
    """The job config's settings, then the sweep's base, then the scale's; its seed, output_dir and axis
    fields do not count. Cells equal those of a spec that writes the same settings out."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text(yaml.safe_dump({
        "objective": "cfpo", "seed": 5, "batch_ratio": 2, "output_dir": "x", "rollout_batches": 9,
        "eval_every": 3, "val_prompts": 4, "proxy": {"hidden_size": 64},
        "trl": {"learning_rate": 1e-4, "num_generations": 8, "beta": 0.1}}))
    (tmp_path / "sweeps").mkdir()
    extended = {**TINY, "scales": {**TINY["scales"], "proxy": {
        "extends": "../configs/job.yaml", "base": {"rollout_batches": 2, "trl.beta": 0.0}}}}
    written_out = {**TINY, "scales": {**TINY["scales"], "proxy": {"base": {
        "rollout_batches": 2, "eval_every": 3, "proxy": {"hidden_size": 64},
        "trl": {"learning_rate": 1e-4, "beta": 0.0}}}}}
    a = make_plan(*load_spec(str(write_spec(tmp_path / "sweeps", extended))), "proxy")
    b = make_plan(*load_spec(str(write_spec(tmp_path, written_out, "plain.yaml"))), "proxy")
    assert [c.hash for c in a.cells] == [c.hash for c in b.cells] and len(a.cells) == 2 * 2 * 2
    cfg = a.cells[0].config
    assert cfg.trl["num_generations"] == 4  # the sweep's base over the job config
    assert (cfg.eval_every, cfg.proxy.hidden_size, cfg.trl["beta"], cfg.val_prompts) == (3, 64, 0.0, 8)
    assert {c.config.objective for c in a.cells} == {"grpo", "cfpo"}
    assert {c.config.seed for c in a.cells} == {0, 1}
    assert {"objective", "batch_ratio", "seed", "output_dir"}.isdisjoint(a.base)  # axes and sweep-managed
    assert a.cells[0].config.output_dir == JobConfig().output_dir


def test_repo_sweeps_extend_the_shared_job_configs():
    """Each proxy setting lives in configs/proxy.yaml and each shared paper setting in configs/paper.yaml:
    no sweep file repeats the proxy model, and every paper and proxy scale extends one of the two."""
    from harness.config import load_config

    for f in sorted((REPO / "sweeps").glob("*.yaml")):
        raw = yaml.safe_load(f.read_text())
        assert raw["scales"]["paper"]["extends"] == "../configs/paper.yaml", f.name
        for name, scale in raw["scales"].items():
            base = scale.get("base", {})
            assert "proxy" not in base and "model" not in base, (f.name, name)
            if name.startswith("proxy"):
                assert scale["extends"] == "../configs/proxy.yaml", (f.name, name)
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert paper.model == "Qwen/Qwen2.5-0.5B-Instruct" and paper.rollout_batches == 200


def confirming(tmp_path, **scale):
    grid = {"base": {"rollout_batches": 2}, "axes": {"iterations": [1, 2]}}
    spec = {**TINY, "scales": {**TINY["scales"], "explore": {**grid, "seeds": [0, 1]},
                               "confirm": {**grid, "confirms": "explore", **scale}}}
    return write_spec(tmp_path, spec)


def test_a_confirmation_reusing_exploration_seeds_is_refused(tmp_path, capsys):
    """One line, exit 2, for a spec whose confirmatory seeds overlap the exploration's, a --set seed that does,
    and a confirms: naming no scale; fresh seeds plan, with on_policy_seeds thinning the on-policy cells."""
    from harness.cli import main

    for scale, message in [({"seeds": [1, 7]}, "scales.confirm.seeds: [1] also seed the exploration 'explore'"),
                           ({"seeds": [7], "confirms": "nosuch"}, "confirms 'nosuch': allowed: another scale"),
                           ({}, "[0, 1] also seed the exploration")]:  # the sweep's seeds [0, 1] by default
        assert main(["sweep", str(confirming(tmp_path, **scale)), "--scale", "confirm", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    path = confirming(tmp_path, seeds=[7, 8, 9], on_policy_seeds=1)
    argv = ["sweep", str(path), "--scale", "confirm", "--dry-run", "--set", "seed=[1, 7]"]
    assert main(argv) == 2 and "--set seed: [1] also seed the exploration" in capsys.readouterr().err
    plan = make_plan(*load_spec(str(path)), "confirm")
    seeds = {(c.config.batch_ratio, c.config.iterations): set() for c in plan.cells}
    for c in plan.cells:
        seeds[(c.config.batch_ratio, c.config.iterations)].add(c.axes["seed"])
    assert seeds == {(1, 1): {7}, (1, 2): {7, 8, 9}, (2, 1): {7, 8, 9}, (2, 2): {7, 8, 9}}


def test_a_scale_axis_replaces_the_sweep_axes_over_the_same_fields(tmp_path):
    spec = {**TINY, "scales": {**TINY["scales"], "proxy": {"base": {"rollout_batches": 2},
                                                            "axes": {"batch_ratio+iterations": [[1, 1], [2, 2]]}}}}
    plan = make_plan(*load_spec(str(write_spec(tmp_path, spec))), "proxy")
    assert {(c.config.batch_ratio, c.config.iterations) for c in plan.cells} == {(1, 1), (2, 2)}
