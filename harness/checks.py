"""Will this job at least start? Its values checked by the objects the job builds, before anything is written.

`check_job(cfg)` builds, without training, what a job builds from its config: GRPOConfig itself (from the same
`harness.trl_args.grpo_config_kwargs` as the job, on CPU), the optimizer and learning-rate scheduler the
Trainer creates (on a dummy parameter, one step each) and the generation config TRL samples with (one token
from a tiny random model, so the sampling processors check their values too). Those objects' own checks do the
work; `TRL_RULES` adds ranges only for knobs that no library checks before training is under way. The build is
cached by what reaches those objects, so a sweep builds them once per distinct TRL section and batch shape,
not once per cell.

Every problem is a `ConfigError` naming the field and what is allowed (harness.config.build_config adds
where).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.trl_args import grpo_config_kwargs, shape_of

if TYPE_CHECKING:
    from harness.config import JobConfig


# Here rather than in harness.config, which validates with check_job: `from harness.config import ConfigError`
# reaches this same class.
class ConfigError(ValueError):
    """A bad config value; the CLI prints it on one line and exits with code 2."""


def _finite_at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > low if strict else v >= low)


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v in allowed


# Knobs GRPOConfig accepts unchecked, and that the optimizer, scheduler and sampler never check either:
# name -> (test, what is allowed and why). TRL's own names; a knob not listed here is left to the libraries.
TRL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # KL coefficient: a negative beta turns the penalty into a bonus for drifting from the reference.
    "beta": (_finite_at_least(0), "a finite number >= 0 (a negative KL coefficient rewards drifting away)"),
    # GRPO's clip half-width and CFPO's penalty scale |A|/(2 eps): negative inverts the clip region and the
    # penalty.
    "epsilon": (_finite_at_least(0, strict=True),
                "a finite number > 0 (the clip half-width; negative inverts it)"),
    # Upper clip half-width (DAPO's clip-higher), also CFPO's penalty scale where A > 0: same reasons as
    # epsilon.
    "epsilon_high": (lambda v: v is None or _finite_at_least(0, strict=True)(v),
                     "a finite number > 0 (the upper clip half-width; negative inverts it)"),
    # SAPO's gate sigma(tau (r - 1)) 4 / tau: tau <= 0 divides by zero or turns the gate around.
    "sapo_temperature_pos": (_finite_at_least(0, strict=True),
                             "a finite number > 0 (SAPO's gate temperature)"),
    "sapo_temperature_neg": (_finite_at_least(0, strict=True),
                             "a finite number > 0 (SAPO's gate temperature)"),
    # transformers skips its top-p filter when top_p >= 1 and keeps one token at 0: neither is checked.
    "top_p": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "0 < top_p <= 1"),
    # AdamW checks only its default weight decay; the Trainer passes weight_decay per parameter group,
    # unchecked.
    "weight_decay": (_finite_at_least(0),
                     "a finite number >= 0 (negative weight decay inflates the weights)"),
    # 0 turns gradient clipping off; a negative value would too, silently, and grad_clipped would read 1
    # always.
    "max_grad_norm": (lambda v: v is None or _finite_at_least(0)(v), "a finite number >= 0 (0: no clipping)"),
    # TRL reads these names only inside the loss, after the first rollout batch has been generated.
    "loss_type": (_one_of("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"),
                  "one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo"),
    "scale_rewards": (_one_of("group", "batch", "none", True, False), "one of group, batch, none"),
    "importance_sampling_level": (_one_of("token", "sequence"), "one of token, sequence"),
    "multi_objective_aggregation": (_one_of("sum_then_normalize", "normalize_then_sum"),
                                    "one of sum_then_normalize, normalize_then_sum"),
    "vllm_mode": (_one_of("colocate", "server"), "one of colocate, server"),
    "vllm_importance_sampling_mode": (
        _one_of("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
        "one of token_truncate, token_mask, sequence_truncate, sequence_mask"),
}

_BUILT: dict[str, str | None] = {}  # build key -> None (built) or the first rejection, as "what: message"


def check_job(cfg: JobConfig) -> None:
    """Raise ConfigError (message starts with the field) if the job's values would not start training."""
    for knob, (ok, allowed) in TRL_RULES.items():
        if knob in cfg.trl and not _safe(ok, cfg.trl[knob]):
            raise ConfigError(f"trl.{knob}={cfg.trl[knob]!r}: allowed: {allowed}")
    problem = _build_cached(cfg)
    if problem is None:
        return
    # Name the knob: the one whose removal lets everything build (the libraries' messages seldom name it).
    culprits = [k for k in cfg.trl if _builds_without(cfg, k)]
    if len(culprits) == 1:
        raise ConfigError(f"trl.{culprits[0]}={cfg.trl[culprits[0]]!r}: rejected by {problem}")
    raise ConfigError(f"trl: the settings together are rejected by {problem}")


def _builds_without(cfg: JobConfig, knob: str) -> bool:
    try:
        without = {k: v for k, v in cfg.trl.items() if k != knob}
        return _build_cached(cfg.model_copy(update={"trl": without})) is None
    except ValueError:  # without it the batch shape is impossible: not the culprit
        return False


def _safe(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except TypeError:  # e.g. a list compared with a number
        return False


def _build_cached(cfg: JobConfig) -> str | None:
    shape = shape_of(cfg)
    key = json.dumps({"trl": cfg.trl, "shape": dataclasses.asdict(shape),
                      "rollout_batches": cfg.rollout_batches}, sort_keys=True, default=repr)
    if key not in _BUILT:
        _BUILT[key] = _build(cfg, shape)
    return _BUILT[key]


def _build(cfg: JobConfig, shape) -> str | None:
    """Build GRPOConfig, optimizer, scheduler and generation config as the job would; the first rejection."""
    import torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # deprecation notes and generation hints are not the user's problem here
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            stage = "GRPOConfig"
            try:
                from trl import GRPOConfig

                args = GRPOConfig(**grpo_config_kwargs(cfg, shape, "cpu"))
                stage = f"the optimizer ({args.optim.value if hasattr(args.optim, 'value') else args.optim})"
                optimizer = _optimizer(args)
                name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
                stage = f"the learning-rate scheduler ({name})"
                _scheduler(args, optimizer)
                stage = "the generation config"
                generation = _generation_config(args)
                stage = "sampling"
                _sample(generation)
            except Exception as e:  # any rejection by the libraries: that is what this check is for
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                return f"{stage}: {first}"
    finally:
        hf_logging.set_verbosity(verbosity)
    return None


def _optimizer(args):
    """The optimizer class and arguments the Trainer derives from args, on one dummy parameter, stepped
    once."""
    import torch
    from transformers import Trainer

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    optimizer = optimizer_cls([{"params": [param], "weight_decay": args.weight_decay}], **kwargs)
    param.grad = torch.ones_like(param)
    optimizer.step()
    return optimizer


def _scheduler(args, optimizer) -> None:
    from transformers.optimization import get_scheduler

    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.get_warmup_steps(args.max_steps),
                              num_training_steps=args.max_steps,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    scheduler.step()


def _generation_config(args):
    """As GRPOTrainer builds it for transformers generation (its vLLM path reads the same sampling knobs)."""
    from transformers import GenerationConfig

    kwargs = {"max_new_tokens": args.max_completion_length, "do_sample": True, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
              "cache_implementation": args.cache_implementation, **(args.generation_kwargs or {})}
    return GenerationConfig(**kwargs, disable_compile=True)


_TINY_MODEL = None


def _sample(generation) -> None:
    """One sampled token from a tiny random Llama: transformers builds (and checks) every sampling
    processor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    global _TINY_MODEL
    if _TINY_MODEL is None:
        torch.manual_seed(0)
        _TINY_MODEL = LlamaForCausalLM(LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)).eval()
    one_token = copy.deepcopy(generation)
    one_token.max_new_tokens = 1
    prompt = torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        _TINY_MODEL.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=one_token)


# ------------------------------------------------------------------------------------------------ paths
def writable_dir(where: str, path: str | Path) -> None:
    """`path` is, or can be created as, a folder this process may write in."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{where} {path}: exists and is not a folder; "
                          "allowed: a folder, or a path to create one")
    existing = next(a for a in (p, *p.parents) if a.exists())
    if not existing.is_dir():
        raise ConfigError(f"{where} {path}: {existing} is not a folder; "
                          "allowed: a path under a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} {path}: {existing} is not writable; "
                          "allowed: a path under a writable folder")


def writable_file(where: str, path: str | Path) -> None:
    """`path` is, or can be created as, a file this process may write."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise ConfigError(f"{where} {path}: is a folder; allowed: a file path")
    writable_dir(f"{where} {path}: folder", p.parent)


# ------------------------------------------------------------------------------------------ command lines
def finite_options(args: Any) -> None:
    """Every float option of a parsed command line is finite: argparse's float() takes nan and inf, which slip
    past every `< 0` check after it."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: allowed: a finite number")


def port(where: str, host: str, number: int) -> None:
    """A TCP port a server can listen on at `host`: in range and free, checked by binding it."""
    import socket

    if not 1 <= number <= 65535:
        raise ConfigError(f"{where} {number}: allowed: a port number from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host or None, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: cannot be resolved ({e}); allowed: an address of this machine "
                          "such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as e:
            raise ConfigError(f"{where} {number}: cannot listen on {host} ({e.strerror}); "
                              "allowed: a free port this user may open (1024 and above)") from None
