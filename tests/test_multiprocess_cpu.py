"""Multi-process cells for real, on CPU: a sweep worker launches each cell the way it launches a cell of
`gpus_per_job: 2` (harness.launch.job_command: `accelerate launch --num_processes 2 --multi_gpu --num_machines 1
--main_process_port P -m harness train ...`), and the two training processes run for real on CPU over gloo.

Nothing is replaced: the worker, the ledger, accelerate, torchrun, the job, TRL and MLflow all run. The only thing
that differs from a GPU machine is the device: without CUDA each rank trains on CPU. The worker runs in a thread
of the test process (so it does not take over pytest's signal handlers), because `harness worker` itself refuses
`gpus_per_job` > 1 on a machine without CUDA GPUs, as it should for users.
What still needs CUDA, and stays a stand-in in tests/test_multi_gpu.py: pinning each worker to its own GPUs, and
ZeRO-2 (DeepSpeed).

The cells train on `chain-sum-probe` (harness.tasks), not the study's exact-match `chain-sum`: on some machines the
tiny proxy samples no right answer in three rollout batches, every reward is 0, every advantage and gradient is 0 and
nothing can be said about training. The probe's reward adds a tie-break that is a fixed function of each completion,
so any group whose sampled completions differ at all (every one, in practice, at temperature 1) has non-zero
advantages, whatever the model gets right: that the weights moved is then a property of the code, not of the draw.
"""
from __future__ import annotations

import json
import threading

import pytest
import torch
import yaml
from conftest import TINY_JOB
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from harness.config import parse_overrides
from harness.sweep.ledger import DEEPSPEED, GPUS_PER_JOB, Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage
from harness.sweep.worker import Worker, WorkerOptions
from harness.tasks import get_task

ROLLOUT_BATCHES = 3
# conftest's TINY_JOB as a sweep base: the session's proxy (built by the first cell's rank 0 when no earlier test
# built it; the other rank waits for it; chain-sum-probe shares chain-sum's proxy), saved after training.
SPEC = {
    "study": "mproc",
    "base": {**parse_overrides(TINY_JOB), "model": "proxy", "task": "chain-sum-probe", "batch_ratio": 2,
             "rollout_batches": ROLLOUT_BATCHES, "val_prompts": 8, "save_model": True},
    "axes": {"objective": ["grpo", "cfpo"]},
    "seeds": [0],
    "scales": {"paper": {"base": {}}, "proxy": {"base": {}}},
}
PROMPT_TOKENS = 10  # "<bos>12+34+56=": BOS and nine characters


@pytest.fixture
def two_process_sweep(tmp_path, proxy_cache, monkeypatch):
    """Both cells run by one worker, as 2-process jobs on CPU; returns (ledger, results dir, MLflow client)."""
    results = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    monkeypatch.setenv("HARNESS_CACHE", str(proxy_cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no developer's accelerate default config applies
    for var in ("HARNESS_TRAIN_CMD", "HARNESS_ACCELERATE_CMD", "CUDA_VISIBLE_DEVICES", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    plan = make_plan(*load_spec(str(spec)), "proxy")
    journal = tmp_path / "ledger.journal"
    ledger = Ledger(open_storage(str(journal)), plan.experiment, create=True)
    ledger.set_attr(GPUS_PER_JOB, 2)  # what the driver records for a scale with gpus_per_job: 2
    ledger.set_attr(DEEPSPEED, "none")
    for c in plan.cells:
        ledger.enqueue(c.hash, c.axes, c.job_fields(), c.cost, attempt=1)
    opts = WorkerOptions(storage=str(journal), study="mproc", scale="proxy", results=str(results), name="w0")
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(Worker(opts).run()), name="worker")
    thread.start()
    thread.join(timeout=900)
    assert not thread.is_alive(), "the worker did not finish its two cells in 15 minutes"
    assert code == [0]
    return ledger, results / "mproc" / "proxy", MlflowClient(uri)


def test_probe_reward_separates_different_completions():
    """What the multi-process cells rely on: a group's rewards differ whenever its completions do, even when no
    answer is right, and a right answer still outscores any wrong one (exact match plus less than 0.01)."""
    eos = 3
    reward = get_task("chain-sum-probe").reward_func(eos_token_id=eos)
    texts = ["1+2=3,3+4=7;7", "1+2=3,3+4=8;8", "1+2=3,3+4=8;9", "1+2=3,3+4=8;9"]
    ids = [[5, 6, eos], [5, 7, eos], [5, 8, eos], [5, 8]]  # the last one never ended: exact match scores it 0
    got = reward(texts, answer=["7"] * 4, completion_ids=ids)
    assert len(set(got)) == 4 and got == reward(texts, answer=["7"] * 4, completion_ids=ids)  # distinct, fixed
    assert 1 <= got[0] < 1.01 and all(0 <= r < 0.01 for r in got[1:])
    assert get_task("chain-sum-probe").score("1+2=3,3+4=7;7.5", "7") == 0.0  # validation: exact match only


def test_two_process_cells_of_each_objective(two_process_sweep):
    """Both objectives train as 2-process cells, and training did something: the saved weights differ from the
    proxy's. With the probe reward this holds by construction, so a failure means the gradients were not computed
    or not applied, not that the sampler drew no right answer (see the module docstring)."""
    ledger, sweep_dir, client = two_process_sweep
    cells = ledger.cells()
    assert sorted(c.axes["objective"] for c in cells) == ["cfpo", "grpo"]
    for cell in cells:
        log = next((sweep_dir / "jobs" / cell.hash).glob("attempt-*.log")).read_text()
        assert cell.state == "complete", log[-3000:]
        # Launched as the worker launches any 2-device cell; both ranks trained (rank 1 logs without a run).
        assert "accelerate launch --num_processes 2 --multi_gpu --num_machines 1 --main_process_port" in log
        assert "-m harness train" in log and log.count("MLflow run None") == 1
        assert "terminate called" not in log  # the process group is torn down before exit
        result = json.loads((sweep_dir / "jobs" / cell.hash / "result.json").read_text())
        assert result["status"] == "complete"
        assert result["steps_per_rollout_batch"] == [2] * ROLLOUT_BATCHES  # batch_ratio 2, iterations 1
    # Only rank 0 records: one MLflow run per cell.
    exp = client.get_experiment_by_name("mproc/proxy")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and {r.data.tags["objective"] for r in runs} == {"grpo", "cfpo"}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["harness.gpus_per_job"] == "2"
        # The global batch is split: each of 2 processes takes 16 / (4 x 2) = 2 micro-batches per rollout batch
        # (1 process: 4), and one optimizer step is 8 / (4 x 2) = 1 micro-batch each.
        assert run.data.params["trl.steps_per_generation"] == "2"
        assert run.data.params["trl.gradient_accumulation_steps"] == "1"
        # ... and 16 completions per rollout batch in all, not 16 per process: TRL's token count over both ranks.
        tokens = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "num_tokens")}
        length = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "completions/mean_length")}
        first = min(length)
        assert tokens[first] == pytest.approx(16 * (PROMPT_TOKENS + length[first]))
        val = client.get_metric_history(run.info.run_id, "val/reward")
        assert [m.step for m in val] == [0, 2, 4, 6]  # once per rollout batch, on rank 0 only
        # Some group's completions differed, so its advantages were non-zero: what the probe reward guarantees
        # unless every group sampled one completion 4 times over (then the next assertions could not hold).
        assert min(m.value for m in client.get_metric_history(run.info.run_id, "frac_reward_zero_std")) < 1
        # The weights did move: gradients (all-reduced over both ranks by DDP) were computed and applied.
        assert max(m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")) > 0
        before = load_file(f"{run.data.params['proxy.path']}/model.safetensors")
        after = load_file(sweep_dir / "jobs" / run.data.tags["harness.cell"] / "model" / "model.safetensors")
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
