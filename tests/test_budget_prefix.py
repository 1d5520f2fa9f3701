"""A shorter budget is a prefix of a longer one: with the constant learning rate of the proxy configs, a job of B
rollout batches logs exactly the first B rollout batches of the same job at 2B (every metric, bit for bit).

This is what lets the confirmatory proxy scale of sweeps/grpo-vs-cfpo.yaml run 25 of the exploration's 30
rollout batches and still be the exploration's setting: its runs are the exploration's runs, stopped earlier.
"""
import json

from conftest import TINY_JOB, run_harness
from mlflow.tracking import MlflowClient


def test_half_the_budget_logs_the_first_half_bit_for_bit(harness_env, tmp_path):
    runs = {}
    for budget in (2, 4):
        out = tmp_path / f"b{budget}"
        proc = run_harness(["train", "configs/proxy.yaml", *TINY_JOB, f"rollout_batches={budget}", "batch_ratio=2",
                            "iterations=2", "objective=cfpo", "task=chain-sum-probe", "seed=7",
                            f"output_dir={out}", "experiment=prefix"], harness_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[budget] = json.loads((out / "result.json").read_text())["run_id"]
    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])
    short, long = (client.get_run(runs[b]).data.metrics for b in (2, 4))
    assert set(short) == set(long)
    last_step = 2 * 2 * 2  # rollout batches x optimizer steps per rollout batch
    compared = 0
    for key in sorted(k for k in short if "time" not in k and "per_second" not in k):  # wall clock differs
        first = {m.step: m.value for m in client.get_metric_history(runs[2], key)}
        second = {m.step: m.value for m in client.get_metric_history(runs[4], key) if m.step <= last_step}
        if second:  # else TRL's end-of-training summary (total_flos, train_loss), logged at a run's end only
            assert first == second, key
            compared += 1
    assert compared >= 15 and {"val/reward", "loss", "rollout_kl", "grad_norm"} <= set(short)
    assert max(m.step for m in client.get_metric_history(runs[4], "loss")) == 2 * last_step
