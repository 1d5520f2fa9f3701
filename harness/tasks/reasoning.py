"""Reasoning tasks on real data: GSM8K and MATH, scored by a maintained verifier (math-verify).

Data (Hugging Face Hub names, or a local folder; see `_ReasoningTask`):
  gsm8k  train: "openai/gsm8k" config "main" split "train" (7,473)   val: same, split "test" (1,319)
         columns question, answer; the gold answer is what follows "####" in `answer`.
  math   train: "DigitalLearningGmbH/MATH-lighteval" config "default" split "train" (7,500; the original
                Hendrycks MATH train split in one config, columns problem, level, type, solution)
         val:   "HuggingFaceH4/MATH-500" split "test" (500; the PRM800K subset of the MATH test split, columns
                problem, solution, answer, subject, level, unique_id). Being part of MATH test, it shares no
                problem with the train split. The gold answer is the `answer` column, or, for a record without
                one, the content of the last \\boxed{} of `solution`.

Prompt: the question, a blank line, then INSTRUCTION ("... put your final answer within \\boxed{}."), the
usual instruction for math RL on base and instruct models. Prompts are plain text (the harness applies no chat
template).

Reward: `verify_answer`. Only a *marked* answer in the completion counts: the last \\boxed{...} (or an
explicit "final answer is $...$" in LaTeX); a bare trailing number scores 0, because the prompt asks for a box
and rewarding "the last number in the text" would also reward answers the model never committed to (same rule
as open-r1's accuracy reward). Boxes close together or separated by a short phrase containing , ; "and" "or"
are read by math-verify as one multi-part answer ({18, 20}), so boxing several candidates earns nothing;
MATH's brace-less "\\boxed 5" is not read at all. Equivalence is math-verify's: 1/2 == \\frac{1}{2} == 0.5,
1,000 == 1000, units in \\text{} are dropped (\\boxed{5 \\text{ dollars}} == 5), but bare words are parsed as
symbols (\\boxed{5 dollars} != 5), and sign matters.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from harness.tasks.registry import Row, Task, TieBreakReward, register_task

log = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# math-verify bounds its work with signal.alarm (whole seconds, main thread only). Parsing gets one alarm for
# the whole completion; verify gets one per (gold, prediction) pair (at most 2 x 2), so a pathological
# completion costs at most ~2 + 4*2 s. Legitimate answers parse and compare in milliseconds.
PARSE_TIMEOUT_S = 2
VERIFY_TIMEOUT_S = 2
# Only the tail of a completion is scored: the final answer is at the end, and a signal cannot interrupt a
# single long C-level call (a regex scan of megabytes of text), so the input size itself must be bounded.
MAX_SCORED_CHARS = 4000

# Last box first; no unanchored extraction (see the module docstring).
_COMPLETION_EXTRACTION = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
_GOLD_EXTRACTION = [LatexExtractionConfig()]
_gold_cache: dict[str, list[Any]] = {}
_GOLD_CACHE_MAX = 50_000


# ---------------------------------------------------------------------------------------------- extraction


def gsm8k_final_answer(answer_field: str) -> str | None:
    """The gold answer of a GSM8K record: the text after the last "####", without thousands separators."""
    if "####" not in answer_field:
        return None
    final = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


def gsm8k_solution(answer_field: str, final: str) -> str:
    """The reference solution in the format the prompt asks for: calculator annotations <<48/2=24>> (GSM8K's
    tool-use markup, which no model is asked to produce) removed and "#### x" replaced by a box."""
    steps = re.sub(r"<<[^<>]*>>", "", answer_field.rsplit("####", 1)[0]).strip()
    return f"{steps}\nThe final answer is $\\boxed{{{final}}}$."


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces included; also MATH's rare
    brace-less form "\\boxed 5". None when there is no box or its braces are unbalanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):  # "\boxed 5": the argument runs to the next "$" or whitespace
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip() or None
    return None


# ---------------------------------------------------------------------------------------------- scoring


def _timeouts_available() -> bool:
    # signal.alarm only works on the main thread; elsewhere math-verify raises unless timeouts are disabled.
    # Off the main thread we run without them and rely on MAX_SCORED_CHARS alone.
    return threading.current_thread() is threading.main_thread()


def _parse_gold(gold: str, timeouts: bool) -> list[Any]:
    if gold in _gold_cache:
        return _gold_cache[gold]
    # Wrapping in a box makes the gold go through the same LaTeX normalisation as a boxed prediction.
    parsed = parse(f"\\boxed{{{gold}}}", extraction_config=_GOLD_EXTRACTION,
                   parsing_timeout=PARSE_TIMEOUT_S if timeouts else None)
    if parsed:  # never cache a failure: it may have been a timeout on a loaded machine
        if len(_gold_cache) >= _GOLD_CACHE_MAX:
            _gold_cache.clear()
        _gold_cache[gold] = parsed
    return parsed


def verify_answer(completion: str, gold: str) -> float:
    """1.0 if the marked final answer of `completion` is mathematically equal to `gold`, else 0.0. Never
    raises (bar KeyboardInterrupt): malformed, empty, or pathological completions score 0."""
    try:
        if not isinstance(completion, str) or not isinstance(gold, str) or not completion.strip() \
                or not gold.strip():
            return 0.0
        timeouts = _timeouts_available()
        gold_parsed = _parse_gold(gold, timeouts)
        if not gold_parsed:
            log.warning("math-verify could not parse the gold answer %r; scoring 0", gold[:200])
            return 0.0
        tail = completion[-MAX_SCORED_CHARS:]
        try:
            # raise_on_error so that a timeout surfaces here and is logged in one line, not with the whole
            # text.
            pred = parse(tail, extraction_config=_COMPLETION_EXTRACTION,
                         parsing_timeout=PARSE_TIMEOUT_S if timeouts else None, raise_on_error=True)
        except TimeoutException:
            log.warning("math-verify parsing timed out on a %d-char completion; scoring 0", len(completion))
            return 0.0
        if not pred:
            return 0.0
        # raise_on_error=False: a failing (gold, prediction) pair must not stop the other pairs being
        # compared.
        return float(verify(gold_parsed, pred, timeout_seconds=VERIFY_TIMEOUT_S if timeouts else None))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException; an alarm can land anywhere
        log.debug("scoring failed", exc_info=True)
        return 0.0


# ---------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class HubSplit:
    repo: str
    config: str | None
    split: str


class _ReasoningTask(Task):
    """A dataset task. Records come from the Hub via `datasets.load_dataset`, or, when the environment
    variable `env_var` names a folder, from `train.jsonl` / `test.jsonl` in it (one record per line, Hub
    column names).

    Validation is the first n records of the test split in stored order (fixed across jobs and seeds); train
    rows are the train split shuffled with the seed. When n exceeds the split, further passes are appended,
    each reshuffled, so every problem appears once per pass (the trainer's max_steps drives repetition
    anyway).
    """

    alphabet = ""  # real tokenizer only: there is no proxy model for these tasks
    env_var: str
    hub: dict[str, HubSplit]  # keys "train" and "test"

    def __init__(self) -> None:
        self._rows: dict[str, list[Row]] = {}

    @abstractmethod
    def _to_row(self, record: dict[str, Any]) -> Row | None:
        """One record of the data set as a Row; None drops a record without a usable answer."""

    def _records(self, split: str) -> list[dict[str, Any]]:
        local = os.environ.get(self.env_var)
        if local:
            path = Path(local) / f"{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: {self.env_var}={local} has no {split}.jsonl")
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        src = self.hub[split]
        from datasets import load_dataset

        try:
            return load_dataset(src.repo, src.config, split=src.split).to_list()
        except Exception as e:
            raise RuntimeError(f"{self.name}: could not load {src.repo} ({src.config}, {src.split}) from the "
                               f"Hugging Face Hub or its cache: {e}. To load from disk, set {self.env_var} "
                               f"to a folder holding train.jsonl and test.jsonl.") from e

    def rows(self, split: str) -> list[Row]:
        if split not in self._rows:
            records = self._records(split)
            rows = [r for r in map(self._to_row, records) if r is not None]
            if len(rows) < len(records):  # e.g. a MATH solution without a box: no gold to score against
                log.warning("%s %s: dropped %d of %d records without an extractable answer", self.name, split,
                            len(records) - len(rows), len(records))
            if not rows:
                raise ValueError(f"{self.name}: the {split} split has no usable records")
            self._rows[split] = rows
        return self._rows[split]

    def val_rows(self, n: int) -> list[Row]:
        pool = self.rows("test")
        if n > len(pool):
            raise ValueError(f"val_prompts={n} exceeds the {self.name} validation split of {len(pool)}")
        return pool[:n]

    def train_rows(self, n: int, seed: int) -> list[Row]:
        pool = self.rows("train")
        rng = random.Random(seed)
        out: list[Row] = []
        while len(out) < n:
            order = list(range(len(pool)))
            rng.shuffle(order)
            out.extend(pool[i] for i in order[:n - len(out)])
        return out

    def score(self, completion: str, answer: str) -> float:
        return verify_answer(completion, answer)


def _prompt(question: str) -> str:
    return f"{question.strip()}\n\n{INSTRUCTION}"


@register_task("gsm8k")
class GSM8K(_ReasoningTask):
    """Grade-school word problems (Cobbe et al. 2021); integer answers."""

    name = "gsm8k"
    env_var = "HARNESS_GSM8K_PATH"
    hub = {"train": HubSplit("openai/gsm8k", "main", "train"),
           "test": HubSplit("openai/gsm8k", "main", "test")}

    def _to_row(self, record: dict[str, Any]) -> Row | None:
        final = gsm8k_final_answer(record["answer"])
        if final is None:
            return None
        return Row(prompt=_prompt(record["question"]), answer=final,
                   solution=gsm8k_solution(record["answer"], final))


@register_task("gsm8k-probe")
class GSM8KProbe(TieBreakReward, GSM8K):
    """GSM8K with the tie-break reward (harness.tasks.TieBreakReward), for tests of the paper-scale path."""


@register_task("math")
class MATH(_ReasoningTask):
    """Competition mathematics (Hendrycks et al. 2021); LaTeX answers (fractions, radicals, intervals,
    ...)."""

    name = "math"
    env_var = "HARNESS_MATH_PATH"
    hub = {"train": HubSplit("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
           "test": HubSplit("HuggingFaceH4/MATH-500", None, "test")}

    def _to_row(self, record: dict[str, Any]) -> Row | None:
        solution = record["solution"]
        answer = (record.get("answer") or "").strip() or last_boxed(solution)
        if not answer:
            return None
        return Row(prompt=_prompt(record["problem"]), answer=answer, solution=solution)
