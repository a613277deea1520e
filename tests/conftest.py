"""Shared fixtures: small random-weight checkpoints written by transformers itself (the reference)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]


def build_hf_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model with transformers' own save_pretrained (per-expert keys on disk)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=True, mlp_only_layers=[1], **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, **common)
        model = tf.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = tf.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(cfg)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    # HF's default init is tiny (std 0.02): scale up so logits are well separated and greedy
    # comparisons test the arithmetic, not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(5.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: build_hf_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def hf_models(hf_checkpoints):
    from transformers import AutoModelForCausalLM
    return {f: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for f, d in hf_checkpoints.items()}


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=None)
    return out[0, len(prompt):].tolist()
