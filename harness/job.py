"""One training job end to end: config -> model and task -> HarnessGRPOTrainer -> MLflow run ->
result.json."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from harness import contract
from harness.config import ConfigError, JobConfig, config_hash
from harness.trl_args import BatchShape, grpo_config_kwargs, shape_of
from harness.vllm_support import isolate_rendezvous

log = logging.getLogger("harness.job")


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; allowed here: auto, cpu")
    return requested


def grpo_config(cfg: JobConfig, shape: BatchShape, device: str):
    """GRPOConfig from the user's TRL knobs, the batch shape and hardware-aware defaults."""
    from trl import GRPOConfig

    check_vllm(cfg, device)
    try:
        return GRPOConfig(**grpo_config_kwargs(cfg, shape, device))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"trl: GRPOConfig rejected the settings: {str(e).splitlines()[0]}") from None


def check_vllm(cfg: JobConfig, device: str) -> None:
    from harness.vllm_support import check_vllm as check

    check(cfg.trl, device)  # what works on CPU and what needs CUDA: harness/vllm_support.py


def run_job(cfg: JobConfig, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
            result_path: str | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    import torch

    from harness import tracking
    from harness.objectives import get_objective
    from harness.tasks import get_task

    # Everything that can be rejected is checked before the MLflow run exists.
    device = resolve_device(cfg.device)
    world, main = process_group()
    try:
        shape = shape_of(cfg, world)
    except ValueError as e:
        raise ConfigError(f"batch shape over {world} processes: {e}") from None
    isolate_rendezvous(cfg.trl, world)  # before GRPOConfig: on CPU accelerate would pin MASTER_PORT to 29500
    args = grpo_config(cfg, shape, device)
    objective, task = get_objective(cfg.objective), get_task(cfg.task)
    if cfg.model == "proxy" and not task.alphabet:
        raise ConfigError(f"model: 'proxy' cannot run task {cfg.task!r}; give a Hub name or a local path")

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    digest = config_hash(cfg)
    run_tags = {"objective": cfg.objective, "batch_ratio": str(cfg.batch_ratio),
                "iterations": str(cfg.iterations), "seed": str(cfg.seed), contract.CONFIG_HASH: digest,
                contract.REPLICATE_HASH: config_hash(cfg, without_seed=True),
                contract.STATUS: contract.RUNNING, contract.DEVICE: device,
                **tracking.git_state(), **tracking.package_versions(), **(tags or {})}
    # Under `accelerate launch` every process runs this function; only rank 0 records anything.
    logger_cls = tracking.RunLogger if main else tracking.SilentRunLogger
    logger = logger_cls(cfg.experiment, f"{cfg.objective}-br{cfg.batch_ratio}-it{cfg.iterations}-s{cfg.seed}",
                                run_tags, parent_run_id)
    log.info("MLflow run %s in experiment %r (%s)", logger.run_id, cfg.experiment, tracking.tracking_uri())
    _terminate_as_interrupt()
    t0 = time.time()
    result: dict[str, Any] = {"run_id": logger.run_id, "config_hash": digest, "status": contract.FAILED}
    try:
        logger.log_params({**tracking.flatten(cfg.model_dump(mode="json")),
                           "optimizer_steps_per_rollout_batch": str(shape.optimizer_steps_per_rollout_batch),
                           "trl.steps_per_generation": str(shape.steps_per_generation),
                           "trl.gradient_accumulation_steps": str(shape.gradient_accumulation_steps)})
        if main:
            logger.log_artifact(out / "config.yaml")
            if tracking.loaded_diff():  # the uncommitted code this run's git.diff_hash names
                (out / "code.diff").write_text(tracking.loaded_diff())
                logger.log_artifact(out / "code.diff")
        torch.set_num_threads(cfg.torch_threads)
        result.update(_train(cfg, args, shape, objective, task, logger, main))
    except KeyboardInterrupt:
        logger.set_tags({contract.STATUS: contract.KILLED})
        logger.finish("KILLED")
        raise
    except BaseException as e:
        logger.set_tags({contract.STATUS: contract.FAILED, contract.ERROR: f"{type(e).__name__}: {e}"[:500]})
        logger.finish("FAILED")
        raise
    result["wall_s"] = round(time.time() - t0, 1)
    logger.set_tags({contract.STATUS: result["status"]})
    logger.finish("FINISHED")
    _leave_process_group()
    if not main:
        return result
    path = Path(result_path) if result_path else out / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log.info("job %s: %s", result["status"], json.dumps(result))
    return result


def _train(cfg: JobConfig, args, shape: BatchShape, objective, task, logger, main: bool) -> dict[str, Any]:
    from transformers import PrinterCallback

    from harness.callbacks import DivergenceGuard, GreedyValidation, MLflowMetrics, ProgressReport
    from harness.pruning import TrialPruning
    from harness.tracking import cache_root
    from harness.trainer import HarnessGRPOTrainer

    model_path = cfg.model
    if cfg.model == "proxy":
        from harness.proxy_model import ensure_proxy_model

        # Rank 0 builds it: transformers writes a model only from rank 0 of a process group.
        with args.main_process_first(desc="proxy model"):
            path = ensure_proxy_model(cfg.proxy.for_seed(cfg.seed), task, cache_root())
        meta = json.loads((path / "meta.json").read_text())
        logger.log_params({"proxy.path": str(path), "proxy.params": str(meta["params"]),
                           "proxy.warmstart_val_reward": str(meta["warmstart_val_reward"])})
        model_path = str(path)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    chat = cfg.model != "proxy" and tokenizer.chat_template is not None  # real models: their chat template
    guard = DivergenceGuard()
    metrics = MLflowMetrics(logger, args.max_grad_norm, flush_every=shape.optimizer_steps_per_rollout_batch)
    validation = GreedyValidation(logger, task, task.val_rows(cfg.val_prompts),
                                  every_steps=cfg.eval_every * shape.optimizer_steps_per_rollout_batch,
                                  max_new_tokens=args.max_completion_length, guard=guard, chat=chat)
    # A tuning trial's job (single-process only: a pruner stopping rank 0 alone would leave the others waiting).
    pruning = TrialPruning.from_env(validation, shape.optimizer_steps_per_rollout_batch, cfg.rollout_batches) \
        if main and process_group()[0] == 1 else None
    trainer = HarnessGRPOTrainer(model=model_path, processing_class=tokenizer,
                                 reward_funcs=task.reward_func(tokenizer.eos_token_id), args=args,
                                 train_dataset=task.train_dataset(cfg.train_prompts, cfg.seed, chat),
                                 callbacks=[metrics, guard, *([validation, ProgressReport(
                                     shape.optimizer_steps_per_rollout_batch)] if main else []),
                                     *([pruning] if pruning else [])],
                                 objective=objective)
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    try:
        trainer.train()
    except RuntimeError as e:
        # Sampling from a policy whose logits went non-finite is a divergence, not a harness failure.
        if "probability tensor contains" not in str(e):
            raise
        guard.diverged_at, guard.reason = trainer.state.global_step, f"sampling failed: {e}"

    train_s = time.perf_counter() - t0
    if cfg.save_model:
        trainer.save_model(str(Path(cfg.output_dir) / "model"))
    steps_per_batch = trainer.finish_rollout_accounting()
    expected = shape.optimizer_steps_per_rollout_batch
    full = steps_per_batch[:-1] if guard.diverged_at is not None else steps_per_batch
    # a pruned job stops at a rollout batch boundary (validation runs there), so its batches are all full
    reuse_ok = all(s == expected for s in full)
    status = contract.DIVERGED if guard.diverged_at is not None else contract.COMPLETE
    tags = {contract.STEPS_OK: str(reuse_ok).lower()}
    if pruning is not None and pruning.pruned_at is not None and guard.diverged_at is None:
        status = contract.PRUNED
        tags[contract.PRUNED_AT] = f"{pruning.pruned_at:g}"
    if guard.diverged_at is not None:
        tags.update({contract.DIVERGED_AT: str(guard.diverged_at), contract.DIVERGED_REASON: guard.reason})
    logger.set_tags(tags)
    if not reuse_ok:
        log.warning("rollout batches received %s optimizer steps, expected %d", sorted(set(full)), expected)
    final = {k: metrics.last[k] for k in ("reward", "entropy", "clip_ratio/region_mean", "ratio/abs_dev_mean",
                                          "rollout_kl", "grad_norm") if k in metrics.last}
    if validation.history:
        final["val/reward"] = validation.history[-1][1]
        final["val/reward_initial"] = validation.history[0][1]
    return {"status": status, "steps": trainer.state.global_step, "train_s": round(train_s, 3),
            "final": final, "steps_per_rollout_batch": steps_per_batch,
            "steps_per_rollout_batch_expected": expected, "diverged_at": guard.diverged_at}


def _leave_process_group() -> None:
    """Tear down torch.distributed before exit: left to interpreter shutdown, it now and then aborts a
    finished multi-process job ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_group() -> tuple[int, bool]:
    """(number of processes, whether this is rank 0) as set by `accelerate launch` / torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0


def _terminate_as_interrupt() -> None:
    """SIGTERM (sent by a worker or a scheduler) unwinds like Ctrl-C, so the run is marked KILLED."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
