"""The offline proxy model: a tiny Llama with a character tokenizer, warm-started by supervised training.

Built on first use and cached under `<results>/cache/proxy-models/<key>/`, where the key hashes the proxy
config and the task: every job of a sweep starts from the very same weights. Concurrent builders (parallel
sweep workers) serialise on a file lock; the model is written to a temporary folder and renamed into place.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness.config import ProxyModel
from harness.progress import progress_bar
from harness.tasks import Task
from harness.validation import greedy_accuracy

log = logging.getLogger(__name__)
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_LEN = 64


def proxy_key(proxy: ProxyModel, task: Task) -> str:
    blob = json.dumps({"proxy": proxy.model_dump(), "task": task.name, "alphabet": task.alphabet, "v": 1},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # one pre-token per character; "[\s\S]" because "(?s)." is rejected by tokenizers
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", model_max_length=MAX_LEN)


def build_model(proxy: ProxyModel, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    # Llama, not qwen2: transformers 5 swaps a qwen2 model's saved tokenizer for Qwen2Tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=proxy.hidden_size, intermediate_size=proxy.intermediate_size,
        num_hidden_layers=proxy.num_hidden_layers, num_attention_heads=proxy.num_attention_heads,
        num_key_value_heads=max(1, proxy.num_attention_heads // 2), max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(proxy.init_seed)
    return LlamaForCausalLM(cfg)


def _sft_batch(rows, tokenizer) -> dict[str, torch.Tensor]:
    """Teacher forcing on "<bos>prompt solution<eos>", loss on the completion only (as RL will see it)."""
    seqs, labels = [], []
    for r in rows:
        p = tokenizer(r.prompt)["input_ids"]  # TRL tokenizes prompts the same way (BOS added)
        c = tokenizer(r.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def warm_start(model, tokenizer, task: Task, proxy: ProxyModel) -> None:
    rows = task.train_rows(proxy.warmstart_steps * proxy.warmstart_batch_size, seed=proxy.init_seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=proxy.warmstart_lr)
    model.train()
    bs = proxy.warmstart_batch_size
    for step in progress_bar(range(proxy.warmstart_steps), "warm-starting proxy model"):
        loss = model(**_sft_batch(rows[step * bs:(step + 1) * bs], tokenizer)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def ensure_proxy_model(proxy: ProxyModel, task: Task, cache_root: Path) -> Path:
    """Path of the warm-started proxy model for (proxy, task), building it if it is not cached yet."""
    if not task.alphabet:
        raise ValueError(f"task {task.name!r} has no proxy alphabet; use a real model for it")
    target = cache_root / "proxy-models" / proxy_key(proxy, task)
    if (target / "meta.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same model
        if (target / "meta.json").exists():
            return target
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(task.alphabet)
        model = build_model(proxy, tokenizer)
        warm_start(model, tokenizer, task, proxy)
        acc = greedy_accuracy(model, tokenizer, task, task.val_rows(256), max_new_tokens=32)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"params": sum(p.numel() for p in model.parameters()), "warmstart_val_reward": acc,
                "build_s": round(time.perf_counter() - t0, 1), "proxy": proxy.model_dump(), "task": task.name}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(target)
        log.info("built proxy model %s: %s", target, meta)
    return target
