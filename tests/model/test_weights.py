"""Checkpoint reading: sharded indexes, missing and mismatched tensors, unsupported configs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mesh.config import ConfigError, ModelConfig
from mesh.model.loader import load_model
from mesh.model.weights import WeightError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same(hf_checkpoints, tmp_path):
    src = hf_checkpoints["qwen2_moe"]
    d = _copy(src, tmp_path / "sharded")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, ea = load_model(src, torch.float32)
    b, eb = load_model(d, torch.float32)
    assert torch.equal(a.w.layers[0].attn.qkv, b.w.layers[0].attn.qkv)
    assert torch.equal(ea.layers[-1].down, eb.layers[-1].down)


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    d = _copy(hf_checkpoints["qwen3_moe"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(WeightError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight.*missing"):
        load_model(d, torch.float32)


def test_mismatched_tensor_is_named(hf_checkpoints, tmp_path):
    d = _copy(hf_checkpoints["mixtral"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(WeightError, match=r"k_proj\.weight.*shape \(8, 64\).*\(64, 64\)"):
        load_model(d, torch.float32)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config.json is missing"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported architectures.*LlamaForCausalLM"):
        ModelConfig.from_dir(tmp_path)


def test_real_model_shapes_parse():
    """Qwen3-Coder-30B-A3B's config.json fields (the published model card) give the documented KV size."""
    cfg = ModelConfig.from_hf({
        "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
        "norm_topk_prob": True, "rope_theta": 10000000, "vocab_size": 151936,
        "max_position_embeddings": 262144, "decoder_sparse_step": 1, "mlp_only_layers": []})
    assert cfg.kv_bytes_per_token * 2 == 96 * 1024  # bf16: 96 KiB per token
    assert cfg.num_moe_layers == 48 and cfg.rope_theta == 1e7 and cfg.qk_norm


def test_hybrid_config_and_checkpoint_errors_are_named(hf_checkpoints, tmp_path):
    """Qwen3-Next: a bad layer mix, inconsistent linear-attention heads, and a Gated DeltaNet tensor of
    the wrong shape each fail at load with a message naming the field or tensor."""
    src = hf_checkpoints["qwen3_next"]
    cfg = json.loads((src / "config.json").read_text())
    for change, words in ((dict(layer_types=["linear_attention"] * 4), "no full_attention layer"),
                          (dict(layer_types=["full_attention", "sliding"] * 2), "unsupported layer types"),
                          (dict(layer_types=["full_attention"] * 3), "layer_types has 3 entries"),
                          (dict(linear_num_value_heads=3), "multiple of linear_num_key_heads")):
        with pytest.raises(ConfigError, match=words):
            ModelConfig.from_hf({**cfg, **change})
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.linear_attn.in_proj_ba.weight"] = torch.zeros(4, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(WeightError, match=r"in_proj_ba\.weight.*shape \(4, 64\).*\(8, 64\)"):
        load_model(d, torch.float32)
