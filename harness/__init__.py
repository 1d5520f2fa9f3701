"""Sweep and ablation harness for LLM post-training objectives (GRPO vs CFPO)."""
