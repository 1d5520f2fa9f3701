"""GSM8K and MATH tasks: local loading, splits, shuffling, answer extraction and math-verify scoring.

Everything runs offline on tiny fixtures written to tmp_path in the Hub's column layout; the one Hub test is
skipped when huggingface.co cannot be reached.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from harness.tasks import TASKS, get_task
from harness.tasks.reasoning import (
    INSTRUCTION,
    MAX_SCORED_CHARS,
    gsm8k_final_answer,
    gsm8k_solution,
    last_boxed,
    verify_answer,
)

# ------------------------------------------------------------------------------------------------ fixtures

GSM8K_TRAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A farm has 250 cows and buys 750 more. How many cows does it have?",
     "answer": "It has 250+750 = <<250+750=1000>>1,000 cows.\n#### 1,000"},
    {"question": "The temperature was 3 degrees and fell by 8 degrees. What is it now?",
     "answer": "3-8 = <<3-8=-5>>-5.\n#### -5"},
    {"question": "Tom has 7 apples and eats 2. How many are left?", "answer": "7-2 = <<7-2=5>>5\n#### 5"},
    {"question": "A box holds 12 eggs. How many eggs are in 3 boxes?", "answer": "12*3 = <<12*3=36>>36\n#### 36"},
    {"question": "Sam reads 15 pages a day for 4 days. How many pages?", "answer": "15*4 = <<15*4=60>>60\n#### 60"},
    {"question": "A malformed record with no final answer marker.", "answer": "It is 9."},
]
GSM8K_TEST = [
    {"question": "Janet has 16 eggs and eats 3. She sells the rest at $2 each. How much does she make?",
     "answer": "16-3 = <<16-3=13>>13 eggs.\n13*2 = <<13*2=26>>26 dollars.\n#### 26"},
    {"question": "What is 100 divided by 4?", "answer": "100/4 = <<100/4=25>>25\n#### 25"},
    {"question": "What is 9 times 9?", "answer": "9*9 = <<9*9=81>>81\n#### 81"},
]
# MATH train in the MATH-lighteval layout (no answer column: the gold comes from the last box).
MATH_TRAIN = [
    {"problem": "Compute $\\sin 60^\\circ$.", "level": "Level 1", "type": "Precalculus",
     "solution": "From the unit circle, $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$."},
    {"problem": "Solve $2x = 1$.", "level": "Level 1", "type": "Algebra",
     "solution": "Dividing by 2 gives $x = \\boxed{\\frac{1}{2}}$."},
    {"problem": "What is $2+3$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "We have $2+3 = \\boxed 5$."},
    {"problem": "Find the larger root of $x^2 - 5x + 6 = 0$.", "level": "Level 2", "type": "Algebra",
     "solution": "The roots are $\\boxed{2}$ and $3$, so the larger is $\\boxed{3}$."},
    {"problem": "Which interval?", "level": "Level 3", "type": "Algebra",
     "solution": "The answer is $\\boxed{[2,5)}$."},
    {"problem": "A solution that never boxes its answer.", "level": "Level 1", "type": "Algebra",
     "solution": "The answer is 4."},
]
# MATH test in the MATH-500 layout (answer column present).
MATH_TEST = [
    {"problem": "Convert $(0,3)$ to polar coordinates.", "solution": "... so $\\boxed{\\left( 3, \\frac{\\pi}{2} "
     "\\right)}$.", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
    {"problem": "Evaluate $\\frac{3}{6}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
     "answer": "\\frac{1}{2}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "What is $-2 \\cdot 4$?", "solution": "$\\boxed{-8}$", "answer": "-8", "subject": "Prealgebra",
     "level": 1, "unique_id": "test/prealgebra/2.json"},
]


def write_jsonl(folder: Path, split: str, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def gsm8k(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "gsm8k", "train", GSM8K_TRAIN)
    write_jsonl(tmp_path / "gsm8k", "test", GSM8K_TEST)
    monkeypatch.setenv("HARNESS_GSM8K_PATH", str(tmp_path / "gsm8k"))
    return get_task("gsm8k")


@pytest.fixture
def math_task(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "math", "train", MATH_TRAIN)
    write_jsonl(tmp_path / "math", "test", MATH_TEST)
    monkeypatch.setenv("HARNESS_MATH_PATH", str(tmp_path / "math"))
    return get_task("math")


# ------------------------------------------------------------------------------------------------ loading


def test_registered_without_proxy_alphabet():
    for name in ("gsm8k", "math"):
        task = TASKS[name]()
        assert task.name == name and task.alphabet == ""  # real-model only: job.py rejects model=proxy


def test_gsm8k_local_splits_and_rows(gsm8k):
    val = gsm8k.val_rows(3)
    assert [r.answer for r in val] == ["26", "25", "81"]  # test split, stored order
    assert gsm8k.val_rows(2) == val[:2]
    assert val[0].prompt == GSM8K_TEST[0]["question"] + "\n\n" + INSTRUCTION
    assert "<<" not in val[0].solution and val[0].solution.endswith("$\\boxed{26}$.")
    train = gsm8k.train_rows(6, seed=0)  # the record without "####" is dropped
    assert sorted(r.answer for r in train) == sorted(["72", "1000", "-5", "5", "36", "60"])
    with pytest.raises(ValueError, match="exceeds"):
        gsm8k.val_rows(4)


def test_math_local_splits_and_rows(math_task):
    val = math_task.val_rows(3)
    assert [r.answer for r in val] == [m["answer"] for m in MATH_TEST]  # MATH-500's answer column
    train = math_task.train_rows(5, seed=0)  # the unboxed solution is dropped; the rest come from the last box
    assert sorted(r.answer for r in train) == sorted(["\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}", "5", "3", "[2,5)"])
    assert all(r.prompt.endswith(INSTRUCTION) for r in train)


def test_reference_solutions_score_one(gsm8k, math_task):
    # The gold extraction and the verifier agree: every reference solution earns full reward.
    for task in (gsm8k, math_task):
        for r in task.train_rows(5, seed=3) + task.val_rows(3):
            if "\\boxed{" not in r.solution:  # the brace-less form, which math-verify does not read
                continue
            assert task.score(r.solution, r.answer) == 1.0, (task.name, r)


def test_train_shuffle_is_deterministic_by_seed(gsm8k, tmp_path):
    a = gsm8k.train_rows(6, seed=7)
    assert a == get_task("gsm8k").train_rows(6, seed=7)  # fresh instance, same seed, same order
    orders = {tuple(r.answer for r in gsm8k.train_rows(6, seed=s)) for s in range(8)}
    assert len(orders) > 1  # the seed does change the order
    long = gsm8k.train_rows(15, seed=7)  # beyond the pool: whole reshuffled passes, each problem once per pass
    assert long[:6] == a
    assert sorted(r.answer for r in long[:6]) == sorted(r.answer for r in long[6:12])
    assert len(long) == 15
    ds = gsm8k.train_dataset(4, seed=7)
    assert ds["answer"] == [r.answer for r in a[:4]] and ds["prompt"] == [r.prompt for r in a[:4]]


def test_missing_local_split_is_a_clear_error(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "only-train", "train", GSM8K_TRAIN)
    monkeypatch.setenv("HARNESS_GSM8K_PATH", str(tmp_path / "only-train"))
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        get_task("gsm8k").val_rows(1)


# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("field, final", [
    ("a\n#### 72", "72"), ("x\n#### 1,000", "1000"), ("#### -5 ", "-5"), ("#### 3.5", "3.5"),
    ("no marker 9", None), ("####   ", None), ("a #### 1 then #### 2", "2"),
])
def test_gsm8k_final_answer(field, final):
    assert gsm8k_final_answer(field) == final


def test_gsm8k_solution_strips_calculator_annotations():
    assert gsm8k_solution("48/2 = <<48/2=24>>24\n#### 24", "24") == "48/2 = 24\nThe final answer is $\\boxed{24}$."


@pytest.mark.parametrize("text, boxed", [
    ("$\\boxed{5}$", "5"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{2}, then \\boxed{3}", "3"),  # the last box is the answer
    ("$\\boxed 5$", "5"),  # MATH's brace-less form
    ("\\fbox{7}", "7"),
    ("\\boxed{\\frac{1}{2}", None),  # unbalanced
    ("no box", None), ("\\boxed{}", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


# ------------------------------------------------------------------------------------------------ verification

# (gold, completion, expected). What math-verify 0.9.0 decides, and what we keep as the rule:
EQUIVALENCES = [
    # fractions: exact and decimal forms are equal (numeric comparison at 6 decimals)
    ("\\frac{1}{2}", "so \\boxed{0.5}", 1.0),
    ("\\frac{1}{2}", "\\boxed{1/2}", 1.0),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\dfrac12}", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
    # LaTeX boxes and answers
    ("\\frac{\\sqrt{3}}{2}", "$\\boxed{\\frac{\\sqrt{3}}{2}}$", 1.0),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", 1.0),
    ("[2,5)", "\\boxed{[2, 5)}", 1.0),
    ("[2,5)", "\\boxed{(2, 5)}", 0.0),
    ("x^2+1", "\\boxed{1 + x^2}", 1.0),
    ("20", "\\boxed{18} was my first guess. Checking again gives \\boxed{20}", 1.0),  # the last box counts...
    ("18", "\\boxed{18} was my first guess. Checking again gives \\boxed{20}", 0.0),  # ...not an earlier one
    # ...but boxes close together, or separated by a short phrase with "," ";" "and" "or", are read as one
    # multi-part answer (math-verify's rule for answers such as x = 2 and 5), so hedging earns nothing
    ("20", "\\boxed{18}, \\boxed{20}", 0.0),
    ("20", "\\boxed{18} is wrong; the answer is \\boxed{20}", 0.0),
    ("2, 5", "x = \\boxed{2} and \\boxed{5}", 1.0),
    ("5", "$\\boxed 5$", 0.0),  # MATH's brace-less box is not read by math-verify; the prompt asks for braces
    # thousands separators
    ("1000", "\\boxed{1,000}", 1.0),
    ("1000", "\\boxed{1{,}000}", 1.0),
    ("1000", "\\boxed{1000}", 1.0),
    ("10000", "\\boxed{10,000}", 1.0),
    # units / text: units inside \text{} (and a leading \$) are dropped; bare words become symbols and fail
    ("5", "\\boxed{5 \\text{ dollars}}", 1.0),
    ("5", "\\boxed{\\$5}", 1.0),
    ("5", "\\boxed{5\\text{ cm}}", 1.0),
    ("5", "\\boxed{5 dollars}", 0.0),
    # negatives: sign matters
    ("-5", "\\boxed{-5}", 1.0),
    ("-5", "\\boxed{- 5}", 1.0),
    ("-5", "\\boxed{5}", 0.0),
    ("5", "\\boxed{-5}", 0.0),
    # the answer must be marked (box, or a LaTeX "final answer is $x$"); a bare number is not an answer
    ("5", "The final answer is $5$.", 1.0),
    ("5", "5", 0.0),
    ("5", "The answer is 5 dollars", 0.0),
    ("1000", "The answer is 1,000", 0.0),
    ("72", "#### 72", 0.0),
]


@pytest.mark.parametrize("gold, completion, expected", EQUIVALENCES)
def test_verify_equivalences(gold, completion, expected):
    assert verify_answer(completion, gold) == expected


@pytest.mark.parametrize("completion", [
    "", "   ", "\\boxed{", "\\boxed{5", "}}}{{{", "\\boxed{}", "$$$$", "\\boxed{\\frac{1}{}}", "\\boxed{5}}}}",
    "\\left( \\boxed{(} \\right", "\x00\\boxed{\x00}", "\\boxed{" * 10_000, "$" * 100_000,
    None, 5, ["\\boxed{5}"],  # wrong types from a misbehaving caller
])
def test_malformed_completions_score_zero(completion):
    assert verify_answer(completion, "7") == 0.0


def test_malformed_gold_scores_zero():
    assert verify_answer("\\boxed{5}", "") == 0.0
    assert verify_answer("\\boxed{5}", "\\frac{") == 0.0


def test_huge_completion_is_cut_to_its_tail():
    # Only the last MAX_SCORED_CHARS characters are read: a huge completion is cheap, and its final box counts.
    t = time.perf_counter()
    assert verify_answer("filler " * 300_000 + "\\boxed{42}", "42") == 1.0
    assert verify_answer("\\boxed{42}" + "x" * (MAX_SCORED_CHARS + 1), "42") == 0.0
    assert verify_answer("9" * 2_000_000, "7") == 0.0
    assert time.perf_counter() - t < 5


def test_pathological_expression_is_bounded_by_timeouts():
    # 9^(9^(9^9)) cannot be compared exactly; math-verify's alarm stops it and the completion scores 0.
    t = time.perf_counter()
    assert verify_answer("\\boxed{9^{9^{9^{9}}}}", "5") == 0.0
    assert time.perf_counter() - t < 15


def test_scoring_off_the_main_thread():
    # signal.alarm needs the main thread; elsewhere scoring runs without math-verify's timeouts, never raising.
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.extend([verify_answer("\\boxed{\\frac{2}{4}}", "0.5"),
                                                          verify_answer("\\boxed{3}", "0.5")]))
    worker.start()
    worker.join(30)
    assert out == [1.0, 0.0]


def test_reward_func_requires_eos(gsm8k):
    eos = 2
    reward = gsm8k.reward_func(eos_token_id=eos)
    texts = ["so \\boxed{26}", "so \\boxed{26}", "so \\boxed{27}"]
    ids = [[5, 6, eos], [5, 6, 7], [5, eos]]  # the second was truncated before EOS
    assert reward(texts, answer=["26"] * 3, completion_ids=ids) == [1.0, 0.0, 0.0]
    assert reward(texts, answer=["26"] * 3) == [1.0, 1.0, 0.0]  # no ids: nothing to check


# ------------------------------------------------------------------------------------------------ the Hub


def _hub_unreachable() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        return f"huggingface.co:443 is unreachable ({e})"
    return None


@pytest.mark.slow
def test_hub_datasets_load(monkeypatch):
    reason = _hub_unreachable()
    if reason:
        pytest.skip(f"Hub test needs network access to the Hugging Face Hub: {reason}")
    monkeypatch.delenv("HARNESS_GSM8K_PATH", raising=False)
    monkeypatch.delenv("HARNESS_MATH_PATH", raising=False)
    for name, n_val in (("gsm8k", 1319), ("math", 500)):
        task = get_task(name)
        val = task.val_rows(n_val)
        assert all(r.answer for r in val)
        assert len(task.rows("train")) > 7000
        assert sum(task.score(r.solution, r.answer) for r in val[:50]) >= 45, name  # extraction sanity
