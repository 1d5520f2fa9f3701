"""chain-sum: sums of two-digit numbers written as a chain of steps, the offline proxy's task, and its
tie-break variant."""
from __future__ import annotations

import random

from harness.tasks.registry import Row, Task, TieBreakReward, register_task


@register_task("chain-sum")
class ChainSum(Task):
    """"a+b+c=" -> "a+b=s1,s1+c=s2;s2": a short chain of intermediate sums, then the final answer.

    Two-digit operands; 20-25 completion tokens, so a response is a sequence of steps as in reasoning RL
    (three-token answers make a weak proxy of it). Reward 1 only for the right final answer followed by EOS.
    The validation prompts are a fixed sample (seed 1234) shared by every job; train prompts exclude them.
    """

    name = "chain-sum"
    alphabet = "0123456789+=,;"
    VAL_SEED = 1234
    VAL_POOL = 2000

    @staticmethod
    def _row(a: int, b: int, c: int) -> Row:
        s1 = a + b
        s2 = s1 + c
        return Row(prompt=f"{a}+{b}+{c}=", answer=str(s2), solution=f"{a}+{b}={s1},{s1}+{c}={s2};{s2}")

    @staticmethod
    def _triple(rng: random.Random) -> tuple[int, int, int]:
        return rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)

    def _val_triples(self) -> list[tuple[int, int, int]]:
        rng = random.Random(self.VAL_SEED)
        seen: dict[tuple[int, int, int], None] = {}
        while len(seen) < self.VAL_POOL:
            seen[self._triple(rng)] = None
        return list(seen)

    def val_rows(self, n: int) -> list[Row]:
        if n > self.VAL_POOL:
            raise ValueError(f"val_prompts={n} exceeds the chain-sum validation pool of {self.VAL_POOL}")
        return [self._row(*t) for t in self._val_triples()[:n]]

    def train_rows(self, n: int, seed: int) -> list[Row]:
        held_out = set(self._val_triples())
        rng = random.Random(seed)
        rows = []
        while len(rows) < n:
            t = self._triple(rng)
            if t not in held_out:
                rows.append(self._row(*t))
        return rows

    def score(self, completion: str, answer: str) -> float:
        head, sep, final = completion.strip().rpartition(";")
        return float(bool(sep) and final == answer)


@register_task("chain-sum-probe")
class ChainSumProbe(TieBreakReward, ChainSum):
    """chain-sum with the tie-break reward; same name, so the same cached warm-started proxy."""
