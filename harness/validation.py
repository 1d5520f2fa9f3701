"""Greedy validation: the fraction of held-out prompts the policy answers correctly without sampling."""
from __future__ import annotations

import torch

from harness.tasks import Row, Task


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: Task, rows: list[Row], max_new_tokens: int,
                    batch_size: int = 256, chat: bool = False) -> float:
    """chat: wrap prompts in the model's chat template, as TRL does for conversational prompts."""
    was_training = model.training
    model.eval()
    correct = 0.0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            if chat:
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                                       add_generation_prompt=True) for r in chunk]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            else:
                enc = tokenizer([r.prompt for r in chunk], return_tensors="pt", padding=True)
            enc = enc.to(model.device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            completions = out[:, enc["input_ids"].shape[1]:]
            for r, ids in zip(chunk, completions.tolist()):
                if tokenizer.eos_token_id not in ids:  # truncated: no final answer
                    continue
                text = tokenizer.decode(ids[:ids.index(tokenizer.eos_token_id)], skip_special_tokens=True)
                correct += task.score(text, r.answer)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / max(len(rows), 1)
