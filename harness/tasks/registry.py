"""The task registry: a name and a factory, plus what every task provides (Row, Task).

A task provides train/validation rows ({"prompt", "answer"}), a reward for TRL and for greedy validation, and
for the offline proxy the worked solutions used by the supervised warm start and the characters it needs.
`TieBreakReward` turns any task's reward into one for tests of the training machinery.
"""
from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str):
    def wrap(factory):
        TASKS[name] = factory
        return factory

    return wrap


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


@dataclass(frozen=True)
class Row:
    prompt: str
    answer: str
    solution: str  # a worked completion ending in the answer (proxy warm start only)


class Task(ABC):
    name: str
    alphabet: str = ""  # characters the proxy tokenizer needs; empty for tasks that bring a real tokenizer

    @abstractmethod
    def train_rows(self, n: int, seed: int) -> list[Row]:
        ...

    @abstractmethod
    def val_rows(self, n: int) -> list[Row]:
        ...

    @abstractmethod
    def score(self, completion: str, answer: str) -> float:
        """1.0 for a correct, complete answer, else 0.0."""

    def train_dataset(self, n: int, seed: int, chat: bool = False) -> Dataset:
        """chat: prompts as a user message, so TRL applies the model's chat template."""
        rows = self.train_rows(n, seed)
        prompts = [[{"role": "user", "content": r.prompt}] if chat else r.prompt for r in rows]
        return Dataset.from_dict({"prompt": prompts, "answer": [r.answer for r in rows]})

    def reward_func(self, eos_token_id: int | None):
        """A TRL reward function; a completion that never emitted EOS (truncated) scores 0."""

        def correct_answer(completions, answer, completion_ids=None, **_):
            out = []
            for i, (completion, ans) in enumerate(zip(completions, answer)):
                # chat prompts: TRL passes each completion as its messages,
                # [{"role": "assistant", "content": ...}]
                text = completion if isinstance(completion, str) else completion[-1]["content"]
                ended = completion_ids is None or eos_token_id is None or eos_token_id in completion_ids[i]
                out.append(self.score(text, ans) if ended else 0.0)
            return out

        return correct_answer


class TieBreakReward:
    """Mixin for tests of the training machinery, never a study task: the RL reward is the task's exact match
    plus a tie-break in [0, 0.01) that is a fixed function (CRC-32) of the completion, so different
    completions of a prompt score differently and GRPO's advantages are non-zero whatever a weak model samples
    (exact match alone can give every completion 0, hence zero advantages and gradients). A right answer still
    outscores any wrong one, and validation stays exact match."""

    def reward_func(self, eos_token_id: int | None):
        exact = super().reward_func(eos_token_id)

        def correct_answer_or_tie_break(completions, answer, completion_ids=None, **kw):
            keys = map(repr, completions if completion_ids is None else map(list, completion_ids))
            return [r + 0.01 * zlib.crc32(k.encode()) / 2 ** 32
                    for r, k in zip(exact(completions, answer, completion_ids=completion_ids, **kw), keys)]

        return correct_answer_or_tie_break
