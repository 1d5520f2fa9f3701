"""`just bench`: the harness's training loop against bare TRL, cfpo against grpo, and a job's time to its first
optimizer step, measured so that they hold on a shared, noisy machine.

- Every arm runs in a fresh process of its own, one at a time, with 1 torch thread and OMP_NUM_THREADS=1 (as
  sweep jobs run); arms are interleaved (A B C D E F, A B C D E F, ...) over --repeats rounds (5 by default), so
  machine noise hits all arms alike; every number is reported as the min and the median over the rounds.
- bare / grpo / cfpo (`python -m harness.step_bench --arm NAME`): seconds per optimizer step of the trainer.train()
  call only, wall (perf_counter) and CPU (time.process_time of the arm's process, all its threads). Like for
  like: the bare arm is stock TRL GRPOTrainer on the same model, data, reward and GRPOConfig, given the harness's
  GreedyValidation (with a SilentRunLogger) and DivergenceGuard at the same eval points, so both arms validate
  alike; what the harness adds is its trainer subclass, the objective, MLflow logging and progress reports.
- exec / fork / fork88 (real `python -m harness train` jobs, exec'd or forked from a forkserver that preloaded
  the stack; fork arms are timed after one warm-up job, as a sweep worker sees from its second cell on): from
  time.time() just before the process starts to its MLflow run's start_time (start-up) and to the timestamp of
  metric "loss" at step 1 (first optimizer step); s per rollout batch = result.json's train_s / rollout_batches.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 5  # the fewest rounds whose median shrugs off one or two rounds disturbed by other work
COMMON = ["torch_threads=1", "experiment=bench"]  # one torch thread per job, as sweep jobs run side by side
# (2,2): off-policy, so TRL's old-log-prob pass and cfpo's ratio terms run; 16 steps, 3 evaluations, ~10 s of loop
RATIO = ["batch_ratio=2", "iterations=2", "rollout_batches=4", "eval_every=2", "val_prompts=64"]
# the on-policy cell; also the start-up jobs' config: before step 1, one validation and one generation
CELL11 = ["batch_ratio=1", "iterations=1", "rollout_batches=4", "eval_every=2", "val_prompts=64"]
# 64 optimizer steps per rollout batch on micro-batches of 8 (generation batch 64); 2 batches bound its cost
CELL88 = ["batch_ratio=8", "iterations=8", "rollout_batches=2", "eval_every=2", "val_prompts=64",
          "trl.per_device_train_batch_size=8"]
ARMS = {"bare": ("bare TRL (grpo)", RATIO + ["objective=grpo"]), "grpo": ("harness grpo", RATIO + ["objective=grpo"]),
        "cfpo": ("harness cfpo", RATIO + ["objective=cfpo"]), "exec": ("exec job (1,1)", CELL11),
        "fork": ("fork job (1,1)", CELL11), "fork88": ("fork job (8,8)", CELL88)}
CHILD_ARMS = ("bare", "grpo", "cfpo")  # timed inside their own `python -m harness.step_bench --arm` process
TARGET_RATIO, TARGET_FIRST_STEP_S = 1.03, 2.0
RATIOS = {"harness training loop / bare TRL, s per optimizer step": ("grpo", "bare"),
          "cfpo / grpo (both harness), s per optimizer step": ("cfpo", "grpo")}


class BenchError(Exception):
    """An arm's process failed; the message names its log."""


# ------------------------------------------------------------------------------- inside an arm's own process
def arm_main(name: str, config: str, overrides: list[str]) -> dict:
    from harness.config import load_config

    cfg = load_config(config, [*ARMS[name][1], *COMMON, *overrides])
    timed: dict[str, float] = {}
    if name == "bare":
        steps, validations = _bare_trl(cfg, timed)
        return {"arm": name, "steps": steps, "validations": validations, **timed}
    from harness.job import run_job
    from harness.trainer import HarnessGRPOTrainer

    train = HarnessGRPOTrainer.train  # timed: the same trainer.train() call that harness.job._train times as train_s
    HarnessGRPOTrainer.train = lambda self, *a, **k: _timed(lambda: train(self, *a, **k), timed)
    result = run_job(cfg)
    return {"arm": name, "steps": result["steps"], "run_id": result["run_id"], **timed}


def _timed(fn, timed: dict[str, float]):
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        return fn()
    finally:
        timed.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)


def _bare_trl(cfg, timed: dict[str, float]) -> tuple[int, int]:
    """Stock GRPOTrainer plus the harness's validation and divergence guard, built as harness.job._train does."""
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    from harness.callbacks import DivergenceGuard, GreedyValidation
    from harness.job import grpo_config, resolve_device
    from harness.proxy_model import ensure_proxy_model
    from harness.tasks import get_task
    from harness.tracking import SilentRunLogger, cache_root
    from harness.trl_args import shape_of

    torch.set_num_threads(cfg.torch_threads)
    task, shape = get_task(cfg.task), shape_of(cfg)
    path = str(ensure_proxy_model(cfg.proxy.for_seed(cfg.seed), task, cache_root()))
    tok = AutoTokenizer.from_pretrained(path)
    args = grpo_config(cfg, shape, resolve_device(cfg.device))
    guard = DivergenceGuard()
    validation = GreedyValidation(SilentRunLogger(cfg.experiment, "bare", {}), task, task.val_rows(cfg.val_prompts),
                                  every_steps=cfg.eval_every * shape.optimizer_steps_per_rollout_batch,
                                  max_new_tokens=args.max_completion_length, guard=guard)
    trainer = GRPOTrainer(model=path, processing_class=tok, reward_funcs=task.reward_func(tok.eos_token_id),
                          args=args, train_dataset=task.train_dataset(cfg.train_prompts, cfg.seed),
                          callbacks=[guard, validation])
    trainer.remove_callback(PrinterCallback)  # the harness removes it too (it prints every step's logs)
    _timed(trainer.train, timed)
    return trainer.state.global_step, len(validation.history)


# --------------------------------------------------------------------------------------- the driving process
def run_arm(name: str, config: str, overrides: list[str], out: Path, env: dict[str, str], forkserver) -> dict:
    log = out.with_suffix(".log")
    if name in CHILD_ARMS:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "harness.step_bench", "--arm", name, "--config", config,
                                   *overrides, f"output_dir={out}"], env=env, stdout=subprocess.PIPE, stderr=f,
                                  text=True)
            f.write(proc.stdout)
        if proc.returncode:
            raise BenchError(f"arm {name} exited {proc.returncode}; its output: {log}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    result = out.with_suffix(".json")
    argv = ["train", config, *ARMS[name][1], *COMMON, *overrides, f"output_dir={out}", "--result", str(result)]
    t0 = time.time()
    if name == "exec":
        with open(log, "w") as f:
            code = subprocess.Popen([sys.executable, "-m", "harness", *argv], env=env, stdout=f,
                                    stderr=subprocess.STDOUT).wait()
    else:
        code = forkserver.start(argv, log, env, Path.cwd()).wait()
    if code:
        raise BenchError(f"{name} job exited {code}; its log: {log}")
    return {"arm": name, "t0": t0, **json.loads(result.read_text())}


def measure(arm: str, r: dict, c) -> dict[str, float]:
    """One run's numbers; a job's from its result.json and its MLflow run (read after the last round)."""
    if arm in CHILD_ARMS:
        evaluations = r["validations"] if arm == "bare" else len(c.get_metric_history(r["run_id"], "val/reward"))
        return {"wall_s_per_step": r["wall_s"] / r["steps"], "cpu_s_per_step": r["cpu_s"] / r["steps"],
                "validations": evaluations}
    step1 = min(m.timestamp for m in c.get_metric_history(r["run_id"], "loss") if m.step == 1) / 1000
    return {"startup_s": c.get_run(r["run_id"]).info.start_time / 1000 - r["t0"], "first_step_s": step1 - r["t0"],
            "s_per_rollout_batch": r["train_s"] / len(r["steps_per_rollout_batch"])}  # one entry per rollout batch


def summarize(numbers: dict[str, list[dict[str, float]]]) -> dict:
    """Min and median of every number of every arm; the ratios of the mins and of the medians, wall and CPU."""
    arms = {arm: {k: {"min": min(r[k] for r in rs), "median": statistics.median(r[k] for r in rs)} for k in rs[0]}
            for arm, rs in numbers.items() if rs}
    ratios = {}
    for line, (a, b) in RATIOS.items():
        if a in arms and b in arms:
            r = {f"{c}_{m}": arms[a][f"{c}_s_per_step"][m] / arms[b][f"{c}_s_per_step"][m]
                 for c in ("wall", "cpu") for m in ("min", "median")}
            ratios[line] = {**r, "met": max(r["wall_median"], r["cpu_median"]) <= TARGET_RATIO}
    first = {arm: arms[arm]["first_step_s"]["median"] <= TARGET_FIRST_STEP_S for arm in ("exec", "fork") if arm in arms}
    return {"arms": arms, "ratios": ratios, "first_step_met": first}


def report(s: dict, repeats: int, overrides: list[str], notes: list[str]) -> str:
    a, met = s["arms"], lambda ok: "met" if ok else "NOT met"
    mm = lambda d, f="{:.4f}": f"{f.format(d['min'])} / {f.format(d['median'])}"  # noqa: E731
    lines = [f"harness.step_bench: {repeats} interleaved rounds, each arm a fresh process, 1 torch thread, "
             f"min / median{' (' + ' '.join(overrides) + ')' if overrides else ''}; s/step: the trainer.train() "
             "call only, wall = perf_counter, CPU = process_time of the arm's process (all its threads)",
             f"  {'arm':18s} {'wall s/step':>17s} {'CPU s/step':>17s}   evaluations/run"]
    lines += [f"  {ARMS[k][0]:18s} {mm(a[k]['wall_s_per_step']):>17s} {mm(a[k]['cpu_s_per_step']):>17s}   "
              f"{a[k]['validations']['median']:.0f}" for k in CHILD_ARMS if k in a]
    lines.append(f"  {'job':18s} {'start-up s':>13s} {'first step s':>13s} {'s/rollout batch':>16s}")
    lines += [f"  {ARMS[k][0]:18s} {mm(a[k]['startup_s'], '{:.2f}'):>13s} {mm(a[k]['first_step_s'], '{:.2f}'):>13s} "
              f"{mm(a[k]['s_per_rollout_batch'], '{:.2f}'):>16s}" for k in ("exec", "fork", "fork88") if k in a]
    for line, r in s["ratios"].items():
        lines.append(f"{line} (both arms with validation): wall {r['wall_min']:.3f} min, {r['wall_median']:.3f} median;"
                     f" CPU {r['cpu_min']:.3f} min, {r['cpu_median']:.3f} median; target <= {TARGET_RATIO} "
                     f"(wall and CPU medians): {met(r['met'])}")
    for arm, what in (("exec", "a fresh `python -m harness train`"),
                      ("fork", "forked from the preloaded forkserver, after one warm-up job")):
        if arm in a:
            f, u = a[arm]["first_step_s"], a[arm]["startup_s"]
            lines.append(f"process start -> first optimizer step, {arm} ({what}): {f['min']:.2f} s min, "
                         f"{f['median']:.2f} s median; of which start-up (-> MLflow run created) {u['min']:.2f} / "
                         f"{u['median']:.2f} s, the rest the initial greedy validation and the first rollout "
                         f"generation (real work); target <= {TARGET_FIRST_STEP_S:g} s: "
                         f"{met(s['first_step_met'][arm])}")
    for arm, cell in (("fork", "(1,1)"), ("fork88", "(8,8)")):
        if arm in a:
            r = a[arm]["s_per_rollout_batch"]
            lines.append(f"harness s per rollout batch, cell {cell} ({' '.join(ARMS[arm][1])}): {r['min']:.2f} min, "
                         f"{r['median']:.2f} median")
    return "\n".join([*lines, *notes])


def main(argv: list[str] | None = None) -> int:
    from harness.config import ConfigError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = lambda message: (print(f"error: {message}", file=sys.stderr), sys.exit(2))  # one line
    parser.add_argument("--config", default="configs/proxy.yaml")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved rounds (min and median over them)")
    parser.add_argument("--json", default=None, help="write every number here as JSON")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print one JSON line
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, applied to every arm")
    a = parser.parse_args(argv)
    try:  # every input, before the first folder, process or run exists
        if a.arm is not None:
            if a.arm not in CHILD_ARMS:
                raise ConfigError(f"--arm {a.arm}: allowed: one of {', '.join(CHILD_ARMS)}")
            print(json.dumps(arm_main(a.arm, a.config, a.overrides)))
            return 0
        if a.repeats < 1:
            raise ConfigError(f"--repeats {a.repeats}: allowed: 1 or more")
        from harness.checks import writable_file
        from harness.config import load_config

        if a.json:
            writable_file("--json", a.json)
        for _, spec in ARMS.values():
            load_config(a.config, [*spec, *COMMON, *a.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from harness.sweep.processes import job_env
    from harness.tracking import cache_root, client

    os.environ.setdefault("HARNESS_CACHE", str(cache_root()))  # before the results root moves: reuse built proxies
    tmp = Path(tempfile.mkdtemp(prefix="harness-step-bench-"))
    os.environ.update(HARNESS_RESULTS=str(tmp), MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
                      OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    from harness.sweep.forkserver import Forkserver

    env, notes, arms = job_env(), [], list(ARMS)
    forkserver = Forkserver(env)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    try:  # warm-up: preloads the stack (and builds the proxy if it is not cached), not timed
        run_arm("fork", a.config, [*a.overrides, "rollout_batches=1"], tmp / "warmup", env, forkserver)
        for i in range(a.repeats):
            for arm in arms:
                t0 = time.perf_counter()
                runs[arm].append(run_arm(arm, a.config, a.overrides, tmp / f"{arm}-{i}", env, forkserver))
                print(f"round {i + 1}/{a.repeats} {arm}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = client()
    numbers = {arm: [measure(arm, r, c) for r in rs] for arm, rs in runs.items()}
    summary = summarize(numbers)
    print(report(summary, a.repeats, a.overrides, notes))
    if a.json:
        Path(a.json).write_text(json.dumps({"repeats": a.repeats, "overrides": a.overrides, "arms_config": ARMS,
                                            "runs": numbers, **summary, "notes": notes}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
