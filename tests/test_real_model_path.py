"""The paper-scale code path without a GPU or the Hub: a model given by local path, with a chat template, on
GSM8K-format data read from a local folder, scored by math-verify. The GPU test (bf16, vLLM's CUDA build) is skipped
on CPU; vLLM's CPU build runs the same cell in tests/test_vllm_cpu.py."""
import json
import string

import pytest
import tiny_chat_model
import torch
from conftest import run_harness
from mlflow.tracking import MlflowClient
from test_tasks_reasoning import GSM8K_TEST, GSM8K_TRAIN, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from harness.proxy_model import build_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
SMALL_JOB = ["rollout_batches=2", "eval_every=1", "val_prompts=2", "generation_batch_size=8",
             "trl.num_generations=4", "trl.per_device_train_batch_size=4", "trl.max_completion_length=12"]


@pytest.fixture(scope="module")
def local_chat_model(tmp_path_factory):
    """A tiny random Llama with a character tokenizer over printable ASCII and a chat template, saved to disk
    the way a downloaded Hub model is."""
    path = tmp_path_factory.mktemp("local-model")
    tok = build_tokenizer(string.printable)
    tok.model_max_length = 1024
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_model_with_chat_template_on_gsm8k_format(harness_env, tmp_path, local_chat_model):
    write_jsonl(tmp_path / "gsm8k", "train", GSM8K_TRAIN)
    write_jsonl(tmp_path / "gsm8k", "test", GSM8K_TEST)
    env = {**harness_env, "HARNESS_GSM8K_PATH": str(tmp_path / "gsm8k")}
    out = tmp_path / "job"
    proc = run_harness(["train", "configs/proxy.yaml", f"model={local_chat_model}", "task=gsm8k", "objective=cfpo",
                        "batch_ratio=2", *SMALL_JOB, f"output_dir={out}", "experiment=local-model"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete" and result["steps_per_rollout_batch"] == [2, 2]
    run = MlflowClient(harness_env["MLFLOW_TRACKING_URI"]).get_run(result["run_id"])
    assert {"reward", "val/reward", "cfpo/penalty_mean", "ratio/abs_dev_mean"} <= set(run.data.metrics)
    assert "proxy.path" not in run.data.params  # no proxy model was built


def test_proxy_model_cannot_run_a_real_task(harness_env, tmp_path):
    proc = run_harness(["train", "configs/proxy.yaml", "task=gsm8k", *SMALL_JOB, f"output_dir={tmp_path / 'x'}"],
                       harness_env)
    assert proc.returncode == 2
    assert "model: 'proxy' cannot run task 'gsm8k'" in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.gpu
def test_gpu_cell_with_vllm_and_bf16(harness_env, tmp_path):
    """Needs CUDA and vLLM (docs/SCALE_OUT.md §0): the cell tests/test_vllm_cpu.py runs on CPU, on a GPU: bf16
    training, vLLM's CUDA build generating, TRL's weight sync and importance-sampling correction."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    model = tiny_chat_model.build(tmp_path / "model")  # head_dim 32, warm-started: rewards are not all 0
    env = {**harness_env, "HARNESS_GSM8K_PATH": str(tiny_chat_model.write_gsm8k(tmp_path / "gsm8k"))}
    out = tmp_path / "job"
    proc = run_harness(["train", "configs/proxy.yaml", f"model={model}", "task=gsm8k", "objective=cfpo",
                        "device=cuda", "trl.use_vllm=true", "trl.vllm_mode=colocate",
                        "trl.vllm_gpu_memory_utilization=0.3", "batch_ratio=2", "trl.learning_rate=3e-4",
                        *SMALL_JOB, f"output_dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete"
    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.data.tags["harness.device"] == "cuda"
    assert {"sampling/importance_sampling_ratio/mean", "sampling/sampling_logp_difference/mean"} <= set(
        run.data.metrics)
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "sampling/sampling_logp_difference/mean")) \
        < 0.01  # weights synced after every optimizer step (bf16 on both sides)
