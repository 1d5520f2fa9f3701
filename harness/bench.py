"""`just bench`: seconds per optimizer step, measured side by side in one process, reported as ratios.

- harness job (grpo arm) vs a bare TRL GRPOTrainer script on the same config: the harness's overhead
  (diagnostics, synchronous MLflow logging, greedy validation at start and end);
- harness cfpo vs harness grpo: the objective's own cost.
Runs are interleaved (A B C, A B C, ...) so machine noise hits all arms alike; medians are reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_OVERRIDES = ["rollout_batches=8", "batch_ratio=2", "iterations=2", "eval_every=8", "val_prompts=64",
                   "torch_threads=2"]


def bare_trl_seconds_per_step(cfg) -> float:
    """The same model, data, reward and GRPOConfig through stock GRPOTrainer, nothing else."""
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from harness.config import shape_of
    from harness.job import grpo_config
    from harness.proxy_model import ensure_proxy_model
    from harness.tasks import get_task
    from harness.tracking import cache_root

    torch.set_num_threads(cfg.torch_threads)
    task = get_task(cfg.task)
    path = str(ensure_proxy_model(cfg.proxy, task, cache_root()))
    tok = AutoTokenizer.from_pretrained(path)
    args = grpo_config(cfg, shape_of(cfg), "cpu")
    trainer = GRPOTrainer(model=path, processing_class=tok, reward_funcs=task.reward_func(tok.eos_token_id),
                          args=args, train_dataset=task.train_dataset(cfg.train_prompts, cfg.seed))
    t0 = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - t0) / trainer.state.global_step


def harness_seconds_per_step(cfg) -> float:
    from harness.job import run_job

    result = run_job(cfg)
    return result["train_s"] / result["steps"]


def main(argv: list[str] | None = None) -> int:
    from harness.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/proxy.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    a = parser.parse_args(argv)
    base = [*BENCH_OVERRIDES, *a.overrides, "experiment=bench"]
    try:  # every arm's config, before the first folder or run exists
        if a.repeats < 1:
            raise ConfigError(f"--repeats {a.repeats}: allowed: 1 or more")
        for objective in ("grpo", "cfpo"):
            load_config(a.config, [*base, f"objective={objective}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HARNESS_RESULTS", tempfile.mkdtemp(prefix="harness-bench-"))
    out = Path(os.environ["HARNESS_RESULTS"]) / "jobs"
    arms = {
        "bare TRL (grpo)": lambda: bare_trl_seconds_per_step(load_config(a.config, [*base, "objective=grpo",
                                                                                    f"output_dir={out}/bare"])),
        "harness grpo": lambda: harness_seconds_per_step(load_config(a.config, [*base, "objective=grpo",
                                                                                f"output_dir={out}/grpo"])),
        "harness cfpo": lambda: harness_seconds_per_step(load_config(a.config, [*base, "objective=cfpo",
                                                                                f"output_dir={out}/cfpo"])),
    }
    arms["bare TRL (grpo)"]()  # warm-up: builds the proxy model and fills caches outside the measurement
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(a.repeats):
        for name, arm in arms.items():
            times[name].append(arm())
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\nseconds per optimizer step, median of {a.repeats} interleaved runs ({' '.join(base)}):")
    for name, v in times.items():
        print(f"  {name:18s} {med[name]:.4f}   runs: {', '.join(f'{x:.4f}' for x in v)}")
    print(f"  harness grpo / bare TRL : {med['harness grpo'] / med['bare TRL (grpo)']:.3f}")
    print(f"  harness cfpo / harness grpo : {med['harness cfpo'] / med['harness grpo']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
