"""A tiny chat model and GSM8K-format data, built offline for tests of the paper-scale path (no Hub here).

The model is what vLLM and TRL need from a real one, at the smallest size vLLM's CPU build accepts: a byte-level
BPE tokenizer trained on the task's own text, a ChatML chat template, a Llama config (not qwen2: transformers 5
swaps a qwen2 model's saved tokenizer) with head_dim 32 (vLLM's CPU attention refuses 16). It is
warm-started on the data's worked solutions until sampled answers are right some of the time and wrong the
rest, so GRPO's advantages, gradients and weight updates are not zero in a few steps.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness.tasks.reasoning import INSTRUCTION, gsm8k_solution

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def records(n: int, seed: int) -> list[dict]:
    """GSM8K-layout records ("question", "answer" ending in "#### x") of one-digit additions."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        answer = f"{a}+{b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"
        out.append({"question": f"What is {a} plus {b}?", "answer": answer})
    return out


def write_gsm8k(folder: Path) -> Path:
    """train.jsonl and test.jsonl in the layout HARNESS_GSM8K_PATH reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 400, 0), ("test", 40, 1)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(n, seed)))
    return folder


def _chat(question: str) -> str:
    return f"<|im_start|>user\n{question}\n\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", model_max_length=256)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(path: Path, warmstart_steps: int = 150, seed: int = 0) -> Path:
    """Tokenizer, model and warm start (150 steps: sampled answers about 40% right), saved to `path` like a
    model downloaded from the Hub."""
    train = records(400, 0)
    sft = [(_chat(r["question"]), gsm8k_solution(r["answer"], r["answer"].rsplit("#### ", 1)[1])) for r in train]
    tok = build_tokenizer([p + s for p, s in sft])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and the jobs need the other core
    try:
        _warm_start(model, tok, sft, warmstart_steps, random.Random(seed))
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _warm_start(model, tok, sft: list[tuple[str, str]], steps: int, rng: random.Random) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = rng.sample(sft, 32)
        seqs, labels = [], []
        for prompt, solution in batch:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            c = tok(solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, seqs))
        loss = model(input_ids=torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs]),
                     attention_mask=torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                     labels=torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
