"""Test-only patch of vLLM's CPU build, loaded into every process of a test job through PYTHONPATH (the job,
each rank `accelerate launch` starts, any process vLLM spawns). Never part of the harness.

Why it is needed: at load, vLLM's CPU build repacks every linear layer's weight for oneDNN
(`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`) and drops the original parameter, or stops
reading it, so TRL's weight sync after an optimizer step cannot update the copy vLLM generates with (it fails
with "'Parameter' object has no attribute 'weight_loader'"). Here linear layers keep a plain F.linear over their
live weight, which is what a CPU build with syncable weights would do; generation, TRL's weight sync and its
importance-sampling correction then run unchanged. harness.vllm_support refuses vLLM on CPU without this.

HARNESS_TEST_NO_WEIGHT_SYNC=1 also makes TRL's weight sync a no-op, so a test can show what the sync prevents.
"""
import importlib.abc
import importlib.machinery
import os
import sys


def _plain_linear(utils) -> None:
    import torch

    repack = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer, remove_weight):
        if layer.weight.ndim != 2:  # conv / MoE weights: not linear layers, left to vLLM
            return repack(layer, remove_weight)
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    utils.dispatch_cpu_unquantized_gemm = dispatch


def _no_sync(vllm_generation) -> None:
    vllm_generation.VLLMGeneration.sync_weights = lambda self: None


PATCHES = {"vllm.model_executor.layers.utils": _plain_linear}
if os.environ.get("HARNESS_TEST_NO_WEIGHT_SYNC") == "1":
    PATCHES["trl.generation.vllm_generation"] = _no_sync


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Patches a module right after it is first imported, so processes that never import vLLM pay nothing."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
