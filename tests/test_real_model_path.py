"""The paper-scale code path without a GPU or the Hub: a model given by local path, with a chat template, on
GSM8K-format data read from a local folder, scored by math-verify. The GPU test (bf16, vLLM) is skipped on CPU."""
import json
import string

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import run_harness
from harness.proxy_model import build_tokenizer
from test_tasks_reasoning import GSM8K_TEST, GSM8K_TRAIN, write_jsonl

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
def test_gpu_cell_with_vllm_and_bf16(harness_env, tmp_path, local_chat_model):
    """Needs CUDA and the vllm extra: one cell, a few steps, vLLM colocated generation, bf16."""
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    write_jsonl(tmp_path / "gsm8k", "train", GSM8K_TRAIN)
    write_jsonl(tmp_path / "gsm8k", "test", GSM8K_TEST)
    env = {**harness_env, "HARNESS_GSM8K_PATH": str(tmp_path / "gsm8k")}
    out = tmp_path / "job"
    proc = run_harness(["train", "configs/proxy.yaml", f"model={local_chat_model}", "task=gsm8k", "objective=cfpo",
                        "device=cuda", "trl.use_vllm=true", "trl.vllm_mode=colocate",
                        "trl.vllm_gpu_memory_utilization=0.3", "batch_ratio=2", *SMALL_JOB, f"output_dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete"
    tags = MlflowClient(harness_env["MLFLOW_TRACKING_URI"]).get_run(result["run_id"]).data.tags
    assert tags["harness.device"] == "cuda"
