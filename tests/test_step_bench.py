"""harness.step_bench: an arm's own process at a tiny budget (real training, no mocks), and the summary arithmetic."""
import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY_JOB

from harness.step_bench import RATIOS, TARGET_RATIO, main, summarize


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["bare", "grpo"])
def test_arm_process_prints_one_json_line_of_positive_numbers(arm, harness_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.step_bench", "--arm", arm, *TINY_JOB, "rollout_batches=1",
                           "val_prompts=8", f"output_dir={tmp_path / 'job'}"], cwd=REPO, env=harness_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the bench's (2,2) cell: 2 x 2 optimizer steps per rollout batch
    assert out["arm"] == arm and out["steps"] == 4
    assert out["wall_s"] > 0 and out["cpu_s"] > 0
    if arm == "bare":  # like for like: greedy validation at the start and at the end, as the harness does
        assert out["validations"] == 2
    else:
        assert out["run_id"]


def test_summary_reports_min_median_and_ratios_of_both():
    def ratio_arm(wall, cpu):
        return [{"wall_s_per_step": w, "cpu_s_per_step": c, "validations": 3} for w, c in zip(wall, cpu)]

    numbers = {"bare": ratio_arm([1.0, 2.0, 1.2, 1.1, 1.3], [1.0, 1.0, 1.0, 1.0, 1.0]),
               "grpo": ratio_arm([1.1, 1.2, 1.3, 3.0, 1.4], [1.02, 1.02, 1.02, 1.02, 1.02]),
               "cfpo": ratio_arm([1.5, 1.6, 1.7, 1.8, 1.9], [1.5] * 5),
               "exec": [{"startup_s": 9.0, "first_step_s": 11.0, "s_per_rollout_batch": 2.0}],
               "fork": [{"startup_s": 0.5, "first_step_s": 1.5, "s_per_rollout_batch": 2.0},
                        {"startup_s": 0.7, "first_step_s": 2.5, "s_per_rollout_batch": 2.2}]}
    s = summarize(numbers)
    assert s["arms"]["bare"]["wall_s_per_step"] == {"min": 1.0, "median": 1.2}
    assert s["arms"]["grpo"]["wall_s_per_step"] == {"min": 1.1, "median": 1.3}
    harness, objective = (s["ratios"][line] for line in RATIOS)
    assert harness["wall_min"] == pytest.approx(1.1) and harness["wall_median"] == pytest.approx(1.3 / 1.2)
    assert harness["cpu_min"] == pytest.approx(1.02) and harness["cpu_median"] == pytest.approx(1.02)
    assert not harness["met"]  # the wall median is over the target even though CPU is under it
    assert objective["wall_median"] == pytest.approx(1.7 / 1.3) and not objective["met"]
    assert s["arms"]["fork"]["first_step_s"] == {"min": 1.5, "median": 2.0}
    assert s["first_step_met"] == {"exec": False, "fork": True}
    assert TARGET_RATIO == 1.03


def test_bad_input_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    for argv, message in ((["--arm", "nope"], "--arm nope: allowed: one of bare, grpo, cfpo"),
                          (["--repeats", "1", "nope=1"], "nope"),
                          (["--repeats", "1", "--json", str(tmp_path)], "--json"),
                          (["--repeats", "abc"], "--repeats")):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors, made one line
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert not (tmp_path / "results").exists()
