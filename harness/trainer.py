"""GRPOTrainer with a pluggable per-token objective and the stability diagnostics the study needs.

- A `stock_trl` objective (grpo) runs GRPOTrainer._compute_loss untouched; the harness only reads the
  log-probs that TRL computed (captured from `_get_per_token_logps_and_entropies`) to add diagnostics.
- Any other objective runs `_objective_loss`, which repeats TRL 1.16's steps around the per-token loss
  (entropy mask, vLLM IS correction, k3 KL to the reference, aggregation by `loss_type`) and its metrics.
  tests/test_trainer_equivalence.py checks it against TRL's own code, loss and gradients.
"""
from __future__ import annotations

import math

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from harness.contract import (
    CLIP_RATIO,
    ENTROPY,
    RATIO_ABS_DEV,
    RATIO_MEASURED,
    REF_KL,
    ROLLOUT_BATCH,
    ROLLOUT_KL,
    STEPS_ON_BATCH,
)
from harness.objectives import SHARED_LOSS_TYPES, Knobs, Objective, Tokens
from harness.objectives.registry import PPO_EPSILON


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1): the mean over each completion's tokens (a sequence-level objective's log-ratio)."""
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


class HarnessGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, objective: Objective, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        if not objective.stock_trl:
            self._check_supported()
        self._capture_logps = False
        self._captured_logps: torch.Tensor | None = None
        # rollout accounting: how many optimizer steps each rollout batch really received
        self.rollout_batches_seen = 0
        self._micro_steps_on_batch = 0
        self.steps_per_rollout_batch: list[int] = []

    def _check_supported(self) -> None:
        a = self.args
        problems = {
            "loss_type": a.loss_type not in SHARED_LOSS_TYPES and f"must be one of {SHARED_LOSS_TYPES}",
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None and "must be unset",
            "entropy_coef": self._entropy_bonus_enabled and "must be 0 (entropy bonus not ported)",
            "delta": a.delta is not None and "must be unset (two-sided clip applies to grpo only)",
        }
        for field, why in problems.items():
            if why:
                raise ValueError(f"trl.{field} {why} for objective {self.objective.name!r}")
        if self.aux_loss_enabled:
            raise ValueError(f"MoE router aux loss is not supported for objective {self.objective.name!r}")

    # ------------------------------------------------------------------------------------------ hooks
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture_logps:
            self._captured_logps = out[0].detach()
        return out

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not buffered:  # TRL generated a fresh rollout batch
            if self.rollout_batches_seen:
                steps = self._micro_steps_on_batch // self.current_gradient_accumulation_steps
                self.steps_per_rollout_batch.append(steps)
            self.rollout_batches_seen += 1
            self._micro_steps_on_batch = 0
        self._micro_steps_on_batch += 1
        m = self._metrics["train"]
        m[ROLLOUT_BATCH].append(float(self.rollout_batches_seen))
        m[STEPS_ON_BATCH].append(
            float((self._micro_steps_on_batch - 1) // self.current_gradient_accumulation_steps + 1))
        return inputs

    def finish_rollout_accounting(self) -> list[int]:
        """Close the last rollout batch; returns optimizer steps per rollout batch, in order."""
        if self._micro_steps_on_batch:
            self.steps_per_rollout_batch.append(self._micro_steps_on_batch // self.current_gradient_accumulation_steps)
            self._micro_steps_on_batch = 0
        return self.steps_per_rollout_batch

    # ------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        if self.objective.stock_trl:
            self._capture_logps = True
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                self._capture_logps = False
            self._log_ratio_diagnostics(self._captured_logps, inputs, extras={}, trl_metrics_logged=True)
            return loss
        return self._objective_loss(model, inputs)

    def _objective_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True)
        entropy_mask = (self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
                        if self.top_entropy_quantile < 1.0 else None)

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        log_ratio = per_token_logps - old
        if self.objective.sequence_level:
            log_ratio = sequence_mean(log_ratio, mask)

        terms = self.objective.fn(Tokens(log_ratio, advantages, per_token_logps), self.knobs())
        per_token_loss = terms.per_token_loss
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(log_ratio)
            per_token_loss = per_token_loss + self.beta * per_token_kl

        loss = self._aggregate(per_token_loss, mask, inputs)

        mode = "train" if self.model.training else "eval"
        if self.beta != 0.0:
            self._metrics[mode][REF_KL].append(self._global_masked_mean(per_token_kl, mask))
        self._metrics[mode][ENTROPY].append(self._global_masked_mean(entropies, mask))
        self._log_ratio_diagnostics(per_token_logps.detach(), inputs, terms.extras, trl_metrics_logged=False)
        return loss

    def knobs(self) -> Knobs:
        return Knobs(epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                     sapo_temperature_pos=self.args.sapo_temperature_pos,
                     sapo_temperature_neg=self.args.sapo_temperature_neg)

    def _aggregate(self, per_token_loss, mask, inputs):
        """TRL 1.16's reduction for each supported `loss_type`, including its gradient-accumulation scaling."""
        train = self.model.training
        ga = self.current_gradient_accumulation_steps if train else 1.0
        if self.loss_type == "grpo":
            return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
        if self.loss_type == "bnpo":
            return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
        if self.loss_type == "dr_grpo":
            return (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length) / ga
        # dapo: global token mean over the generation batch, rescaled to one accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return (per_token_loss * mask).sum() / normalizer

    # ------------------------------------------------------------------------------------------ metrics
    EXTREMES = {"ratio/max": max, "ratio/min": min}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL averages every metric over the logging window's micro-batches; extremes must stay extremes."""
        mode = "train" if self.model.training else "eval"
        for key, reduce in self.EXTREMES.items():
            values = [v for v in self._metrics[mode].pop(key, []) if not math.isnan(v)]
            if values:
                logs[f"eval_{key}" if mode == "eval" else key] = reduce(values)
        super().log(logs, start_time)

    def _global_masked_mean(self, x, mask) -> float:
        if x.shape[1] == 1:
            s, c = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            s, c = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([s, c]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_ratio_diagnostics(self, per_token_logps, inputs, extras: dict[str, torch.Tensor],
                               trl_metrics_logged: bool) -> None:
        """Ratio statistics, KL to the rollout policy, TRL-defined clip ratios (would-be, for unclipped
        objectives) and the objective's own terms. Token-level, masked, reduced across processes."""
        mode = "train" if self.model.training else "eval"
        m = self._metrics[mode]
        mask = inputs["completion_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        m[RATIO_MEASURED].append(0.0 if old is None else 1.0)
        log_ratio = torch.zeros_like(per_token_logps) if old is None else per_token_logps - old
        coef = torch.exp(sequence_mean(log_ratio, mask) if self.objective.sequence_level else log_ratio)
        r = torch.exp(log_ratio)
        gmm = lambda x: self._global_masked_mean(x, mask)  # noqa: E731
        m["ratio/mean"].append(gmm(r))
        m[RATIO_ABS_DEV].append(gmm((r - 1).abs()))
        # Extremes over this micro-batch, all processes; `log` turns them into extremes over the optimizer step.
        # The gather runs on every rank unconditionally (a rank without tokens sends ±inf): a collective in a
        # data-dependent branch would hang the other ranks.
        live = mask.bool()
        hi = self.accelerator.gather(torch.where(live, r, -torch.inf).amax()).max().item()
        lo = self.accelerator.gather(torch.where(live, r, torch.inf).amin()).min().item()
        m["ratio/max"].append(hi if hi != -float("inf") else float("nan"))
        m["ratio/min"].append(lo if lo != float("inf") else float("nan"))
        # k3 estimator of KL(pi_rollout || pi_theta) on tokens sampled from pi_rollout: (r - 1) - log r >= 0
        m[ROLLOUT_KL].append(gmm((r - 1) - log_ratio))
        for key, value in extras.items():
            m[f"{self.objective.name}/{key}_mean"].append(gmm(value))
        if trl_metrics_logged:
            return
        # Would-be clip rates: at the objective's own trust region, else at PPO's default one.
        eps_low, eps_high = ((self.epsilon_low, self.epsilon_high) if self.objective.has_trust_region
                             else (PPO_EPSILON, PPO_EPSILON))
        is_low = ((coef < 1 - eps_low) & (advantages < 0)).float()
        is_high = ((coef > 1 + eps_high) & (advantages > 0)).float()
        region = torch.maximum(is_low, is_high)
        m["clip_ratio/low_mean"].append(gmm(is_low))
        m["clip_ratio/high_mean"].append(gmm(is_high))
        m[CLIP_RATIO].append(gmm(region))

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(is_low))).item())
        m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(is_high))).item())

