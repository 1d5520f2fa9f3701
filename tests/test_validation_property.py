"""No bad value reaches training: generated overrides and spec mutations go through the real CLIs' validation.

Each input either validates (the command reaches the point where it would start writing: `run_job`,
`run_sweep`) or exits 2 with one line on stderr; never a traceback, and nothing is written under the results
folder. The CLIs' `main(argv)` run in-process (one TRL import for all examples); a few real subprocesses at the
end check the same guarantee end to end.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import harness.job
import harness.sweep.driver
from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "proxy.yaml")
SPEC = {
    "study": "prop",
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-4}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": [0],
    "scales": {"paper": {"base": {"rollout_batches": 5, "model": "some/hub-model", "task": "gsm8k"}},
               "proxy": {"base": {"rollout_batches": 2}}},
}
KEYS = ["batch_ratio", "iterations", "rollout_batches", "generation_batch_size", "eval_every", "val_prompts",
        "seed", "objective", "task", "device", "torch_threads", "save_model", "proxy.hidden_size",
        "proxy.warmstart_lr", "trl.learning_rate", "trl.beta", "trl.epsilon", "trl.temperature", "trl.top_p",
        "trl.top_k", "trl.min_p", "trl.max_completion_length", "trl.num_generations",
        "trl.per_device_train_batch_size", "trl.lr_scheduler_type", "trl.loss_type", "trl.weight_decay",
        "trl.max_grad_norm", "trl.adam_beta1", "trl.adam_epsilon", "trl.warmup_steps", "trl.repetition_penalty",
        "trl.optim", "trl.scale_rewards", "trl.max_steps", "trl.nope", "nope", "proxy.nope", "trl", "a..b", ""]
NUMBERS = st.one_of(st.integers(-10**6, 10**6), st.sampled_from([0, 1, 2, 3, 4, 8, 16, -1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-5, 0.0, -0.5, 1.5, 2.0]))
WORDS = st.one_of(st.sampled_from(["grpo", "cfpo", "dapo", "cosine", "constant", "cpu", "true", "null", "~", "[]",
                                   "[1,", "{a: 1", "[1, 2]", "[1, 1]", "'x", "!!python/name:os.system", "&a *a",
                                   "2020-01-01", ".nan", "-.inf", "1e-5", "0x10", "a: b: c"]),
                  st.text(alphabet="ab01:[]{},'\"!&*-. #|>%@`", max_size=8))
VALUES = st.one_of(NUMBERS.map(str), WORDS)
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES), max_size=3)
FAST = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Validated(Exception):
    """Raised where the command would start writing: everything before it accepted the input."""


def _stop(*_args, **_kwargs):
    raise Validated


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{results}/mlflow.db")
    monkeypatch.setattr(harness.job, "run_job", _stop)
    monkeypatch.setattr(harness.sweep.driver, "run_sweep", _stop)
    monkeypatch.chdir(tmp_path)  # relative output_dir and results/ land here, where the check looks
    return tmp_path


def _outcome(argv: list[str], capsys, sandbox: Path) -> str:
    capsys.readouterr()
    try:
        rc = main(argv)
    except Validated:
        rc = "validated"
    except SystemExit as e:  # argparse: its own exit 2 and usage
        rc = e.code
    except BaseException:
        pytest.fail(f"{argv}: traceback\n{traceback.format_exc()}")
    err = capsys.readouterr().err
    written = sorted(str(p.relative_to(sandbox)) for p in sandbox.rglob("*") if p.name != "spec.yaml")
    assert not written, f"{argv} wrote {written}"
    assert "Traceback" not in err, err
    if rc == "validated":
        event("validated")
        return rc
    assert rc == 2, f"{argv}: exit {rc}: {err}"
    if not err.startswith("usage:"):  # argparse's own errors keep its usage line
        assert err.startswith("error: ") and err.count("\n") == 1, f"{argv}: {err!r}"
    event("usage" if err.startswith("usage:") else "rejected")
    return "rejected"


@FAST
@given(overrides=OVERRIDES)
def test_generated_train_overrides_validate_or_exit_2(sandbox, capsys, overrides):
    _outcome(["train", CONFIG, *overrides, "output_dir=jobs/x"], capsys, sandbox)


def _mutate(spec: dict, path: tuple[str, ...], value) -> dict:
    out = yaml.safe_load(yaml.safe_dump(spec))
    node = out
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node
    if isinstance(node, dict):
        node[path[-1]] = value
    return out


SPEC_PATHS = st.sampled_from([("study",), ("seeds",), ("colour",), ("base", "batch_ratio"), ("base", "trl", "beta"),
                              ("base", "trl", "learning_rate"), ("base", "trl", "temperature"), ("base", "nope"),
                              ("axes", "batch_ratio"), ("axes", "trl.epsilon"), ("axes", "rollout_batches"),
                              ("axes", "nope"), ("scales", "proxy", "base", "rollout_batches"),
                              ("scales", "proxy", "seeds"), ("scales", "proxy", "gpus_per_job"), ("scales", "huge"),
                              ("scales", "proxy", "axes", "iterations"), ("scales", "paper", "base", "trl")])
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.sampled_from(["grpo", "x", "", "1e-5"]))
SPEC_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.just([]), st.just([1, 1]),
                        st.dictionaries(st.sampled_from(["a", "beta", "rollout_batches"]), SCALARS, max_size=2))


@st.composite
def spec_texts(draw) -> str:
    spec = _mutate(SPEC, draw(SPEC_PATHS), draw(SPEC_VALUES))
    text = yaml.safe_dump(spec, sort_keys=False)
    if draw(st.booleans()):  # malformed YAML: cut it, or drop in a stray character
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "[", "{", ":", "\t", "'", "- ", "\n  x: [1,"])) + text[cut + 1:]
    return text


@FAST
@given(text=spec_texts(), sets=st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["batch_ratio", "objective", "seed", "trl.beta", "trl.learning_rate", "trl.temperature", "rollout_batches",
     "nope", "trl.nope", "output_dir"]), VALUES), max_size=2))
def test_generated_specs_and_sets_validate_or_exit_2(sandbox, capsys, text, sets):
    spec = sandbox / "spec.yaml"
    spec.write_text(text)
    argv = ["sweep", str(spec), "--scale", "proxy", "--workers", "1"]
    for item in sets:
        argv += ["--set", item]
    _outcome(argv, capsys, sandbox)


# ------------------------------------------------------------------------------------- end to end, real processes
END_TO_END = [
    (["harness", "train", CONFIG, "trl.learning_rate=-1"], "trl.learning_rate=-1.0: rejected by the optimizer"),
    (["harness", "sweep", "grpo-vs-cfpo", "--scale", "proxy", "--set", "trl.temperature=0"],
     "trl.temperature=0.0: rejected by sampling"),
    (["harness", "sweep", "grpo-vs-cfpo", "--scale", "proxy", "--set", "batch_ratio=[1,"], "not a YAML value"),
    (["harness.ui", "mlflow", "--port", "99999"], "--port 99999: allowed: a port number from 1 to 65535"),
    (["harness.ui", "dashboard", "grpo-vs-cfpo", "--scale", "proxy", "--port", "99999"], "--port 99999"),
    (["harness.step_bench", "--repeats", "0"], "--repeats 0: allowed: 1 or more"),
]


def test_end_to_end_bad_input_is_one_line_exit_2_nothing_written(tmp_path):
    """Real processes, side by side: the exit code and stderr a user sees, and an untouched results folder."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "mlflow.db").touch()  # an existing store: `ui` gets as far as the port
    (results / "grpo-vs-cfpo" / "proxy").mkdir(parents=True)
    (results / "grpo-vs-cfpo" / "proxy" / "ledger.journal").touch()  # an existing ledger for `dashboard`
    before = sorted(results.rglob("*"))
    env = {**os.environ, "HARNESS_RESULTS": str(results), "MLFLOW_TRACKING_URI": f"sqlite:///{results}/mlflow.db",
           "HARNESS_CACHE": str(tmp_path / "cache")}
    procs = [(subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True), argv, message) for argv, message in END_TO_END]
    for proc, argv, message in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (argv, err[-2000:])
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert sorted(results.rglob("*")) == before and not (tmp_path / "cache").exists()
