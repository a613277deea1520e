"""Random-weight preset checkpoints: transformers and the mesh runtime load them and agree."""

from __future__ import annotations

import json

import pytest
import torch

from mesh.config import ModelConfig
from mesh.model.attention import AttentionMetadata, KVCache, PrefillChunk
from mesh.model.linear_attention import StatePool
from mesh.model.loader import load_model
from mesh.model.weights import CheckpointReader, WeightError
from mesh.parallel.local import LocalDispatcher
from mesh.presets import ARCHS, PRESETS, init_model, tensor_specs, train_tokenizer
from mesh.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    # Keep the tokenizer cache inside the test's temp dir: tests never write to the user's home.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny(cache_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {arch: init_model(arch, "tiny", root / arch, seed=0) for arch in ARCHS}


def _mesh_logits(model_dir, ids: list[int]) -> torch.Tensor:
    model, experts = load_model(model_dir, torch.float32)
    cfg = model.cfg
    n, bs = len(ids), 4
    nblocks = -(-n // bs)
    blocks = torch.arange(nblocks).flip(0)  # non-contiguous block order on purpose
    pos = torch.arange(n)
    slots = blocks[pos // bs] * bs + pos % bs  # [n]
    states = StatePool(cfg.num_linear_layers, 1, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim,
                       cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                       cfg.linear_value_head_dim) if cfg.num_linear_layers else None
    kv = KVCache(cfg.num_kv_layers, nblocks, bs, cfg.num_kv_heads, cfg.head_dim, torch.float32, states=states)
    meta = AttentionMetadata(slot_mapping=slots, prefills=[PrefillChunk(0, n, n, blocks)], state_slots=[0])
    with torch.no_grad():
        hidden = model.forward(torch.tensor(ids), pos, meta, kv, LocalDispatcher(experts, cfg.num_experts))
        return model.logits(hidden)  # [n, V]


def _prompt(model_dir) -> list[int]:
    tok = Tokenizer.from_dir(model_dir)
    return tok.encode("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_matches_transformers(arch, tiny):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32, output_loading_info=True)
    # Every tensor on disk is one transformers expects, and none is left to random init.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _prompt(tiny[arch])
    assert len(ids) > 10
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([ids])).logits[0]  # [n, V]
    got = _mesh_logits(tiny[arch], ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert ref.std() > 0.01  # not a degenerate model: the comparison means something


def test_configs_say_what_the_presets_say(tiny):
    p = PRESETS["tiny"]
    for arch, d in tiny.items():
        raw = json.loads((d / "config.json").read_text())
        tok = Tokenizer.from_dir(d)
        assert raw["model_type"] == arch and raw["dtype"] == "float32"
        assert raw["rope_parameters"]["rope_type"] == "default"
        assert raw["eos_token_id"] == tok.token_id("<|endoftext|>")
        assert tok.eos_token_ids[0] == raw["eos_token_id"]
        cfg = ModelConfig.from_hf(raw)
        shape = (cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.head_dim)
        assert shape == (64, 2, 8, 2, 16)
        assert cfg.vocab_size == p.vocab_size == tok.vocab_size
        assert cfg.moe_intermediate_size == 32
    q3 = json.loads((tiny["qwen3_moe"] / "config.json").read_text())
    assert q3["num_experts"] == 8 and q3["norm_topk_prob"] is True
    assert ModelConfig.from_dir(tiny["qwen3_moe"]).moe_layers == (True, False)
    assert ModelConfig.from_dir(tiny["qwen2_moe"]).shared_expert_intermediate_size == 64
    assert ModelConfig.from_dir(tiny["qwen2_moe"]).qkv_bias
    assert ModelConfig.from_dir(tiny["mixtral"]).intermediate_size == 32


def test_on_disk_names_are_the_hub_names(tiny):
    names = {a: set(CheckpointReader(d).names()) for a, d in tiny.items()}
    assert {"model.layers.0.mlp.experts.7.gate_proj.weight", "model.layers.0.mlp.gate.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.1.mlp.down_proj.weight"} <= names["qwen3_moe"]
    assert {"model.layers.1.mlp.shared_expert.up_proj.weight", "model.layers.1.mlp.shared_expert_gate.weight",
            "model.layers.0.self_attn.k_proj.bias"} <= names["qwen2_moe"]
    assert {"model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.gate.weight"} <= names["mixtral"]
    assert not any("experts.gate_up_proj" in n for ns in names.values() for n in ns)


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = init_model("qwen2_moe", "tiny", tmp_path / "again", seed=0)
    other = init_model("qwen2_moe", "tiny", tmp_path / "other", seed=1)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / f).read_bytes() == (tiny["qwen2_moe"] / f).read_bytes(), f
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "config.json").read_bytes() == (again / "config.json").read_bytes()


def test_sharded_write_holds_the_same_tensors(tiny, tmp_path):
    d = init_model("mixtral", "tiny", tmp_path / "sharded", seed=0, max_shard_bytes=64 << 10)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (d / "model.safetensors").exists()
    one, many = CheckpointReader(tiny["mixtral"]), CheckpointReader(d)
    assert sorted(one.names()) == sorted(many.names()) == sorted(index["weight_map"])
    for name in one.names():
        assert torch.equal(one.get(name), many.get(name)), name
    ids = _prompt(d)
    torch.testing.assert_close(_mesh_logits(d, ids), _mesh_logits(tiny["mixtral"], ids), atol=0, rtol=0)


def test_rewriting_single_file_over_shards_removes_stale_shards(cache_env, tmp_path):
    d = init_model("qwen3_moe", "tiny", tmp_path / "m", max_shard_bytes=64 << 10)
    init_model("qwen3_moe", "tiny", d)
    assert [p.name for p in d.glob("*.safetensors")] == ["model.safetensors"]
    assert not (d / "model.safetensors.index.json").exists()


def test_bfloat16_checkpoint(cache_env, tmp_path):
    d = init_model("qwen3_moe", "tiny", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    assert CheckpointReader(d).get("model.embed_tokens.weight").dtype == torch.bfloat16
    model, experts = load_model(d, torch.bfloat16)
    assert experts.num_slots == 8


@pytest.mark.parametrize("arch,preset,bad", [("llama", "tiny", "arch"), ("mixtral", "huge", "preset")])
def test_bad_choices_name_the_valid_ones(arch, preset, bad, tmp_path):
    with pytest.raises(ValueError, match=bad) as e:
        init_model(arch, preset, tmp_path / "x")
    valid = ARCHS if bad == "arch" else tuple(PRESETS)
    assert all(v in str(e.value) for v in valid)
    assert not (tmp_path / "x").exists()


def test_bench_preset_size():
    # ~64M parameters in all; ~22M multiplied per token (top-4 of 16 experts; the embedding
    # table is a lookup, not compute, so it is not counted as active)
    p = PRESETS["bench"]
    specs = tensor_specs("qwen3_moe", p)
    total = sum(torch.Size(s).numel() for _, s, _ in specs)
    experts = sum(torch.Size(s).numel() for n, s, _ in specs if ".experts." in n)
    embed = p.vocab_size * p.hidden_size
    active = total - embed - experts + experts * p.top_k // p.num_experts
    assert 60e6 < total < 70e6 and 20e6 < active < 24e6


def test_tokenizer_training_is_deterministic_and_cached(cache_env):
    a = train_tokenizer(512, use_cache=False)
    b = train_tokenizer(512, use_cache=False)
    assert a.to_str() == b.to_str()
    lines = []
    train_tokenizer(512, progress=lines.append)  # the tiny fixture or this call fills the cache
    lines.clear()
    c = train_tokenizer(512, progress=lines.append)
    assert c.to_str() == a.to_str()
    assert any("cached" in line for line in lines)
    # special tokens come last, as in Qwen vocabularies, so every merge id is below them
    assert a.token_to_id("<|endoftext|>") == 512 - 9 and a.token_to_id("<|file_sep|>") == 511


@pytest.mark.parametrize("preset,shape", [
    ("coder-30b-a3b", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                           head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                           vocab_size=151936, max_position_embeddings=262144)),
    ("coder-480b-a35b", dict(hidden_size=6144, num_hidden_layers=62, num_attention_heads=96, num_key_value_heads=8,
                             head_dim=128, num_experts=160, num_experts_per_tok=8, moe_intermediate_size=2560,
                             vocab_size=151936, max_position_embeddings=262144)),
    ("coder-next", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
                        head_dim=256, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                        shared_expert_intermediate_size=512, linear_num_key_heads=16, linear_num_value_heads=32,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                        vocab_size=151936, max_position_embeddings=262144))])
def test_real_presets_write_the_coder_configs_without_weights(preset, shape, cache_env, tmp_path):
    """--config-only writes the Qwen3-Coder models' config.json and a tokenizer, no weights; the
    runtime reads the real shape (96 KiB of bf16 KV per token for the 30B model)."""
    from mesh.presets import REAL_PRESET_ARCH
    arch = REAL_PRESET_ARCH[preset]
    out = init_model(arch, preset, tmp_path / preset, dtype="bfloat16", config_only=True)
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in shape} == shape
    assert cfg["norm_topk_prob"] is True and cfg["mlp_only_layers"] == []
    assert not list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    mc = ModelConfig.from_dir(out)
    assert mc.num_moe_layers == shape["num_hidden_layers"] and mc.qk_norm
    params = sum(int(torch.tensor(s).prod()) for _, s, _ in tensor_specs(arch, PRESETS[preset]))
    if preset == "coder-30b-a3b":
        assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["rope_parameters"]["rope_theta"] == 1e7
        assert mc.kv_bytes_per_token * 2 == 96 * 1024
        assert 30.4e9 < params < 30.6e9  # 30.5B parameters, as published
    if preset == "coder-next":  # every 4th layer full attention: KV in 12 layers, 24 KiB a token in bf16
        assert cfg["architectures"] == ["Qwen3NextForCausalLM"] and cfg["rope_parameters"]["rope_theta"] == 5e6
        assert mc.num_linear_layers == 36 and mc.rope_dim == 64 and mc.attn_output_gate
        assert mc.kv_bytes_per_token * 2 == 24 * 1024
        assert 79e9 < params < 81e9  # 80B parameters (the multi-token-prediction head aside)
        assert 70e6 < mc.state_bytes_per_sequence < 80e6  # conv + delta-rule states over 36 layers, float32


def test_real_presets_refuse_to_write_random_weights(cache_env, tmp_path):
    with pytest.raises(ValueError, match="--config-only"):
        init_model("qwen3_moe", "coder-30b-a3b", tmp_path / "m")
    with pytest.raises(ValueError, match="--arch qwen3_moe"):
        init_model("mixtral", "coder-30b-a3b", tmp_path / "m", config_only=True)


def test_dummy_weights_follow_the_config_alone(tiny, tmp_path):
    """--load-format dummy: every tensor from config.json's shapes (no safetensors read), norms ones,
    the rest random with the initialiser's scale, the same for the same seed; the engine serves it."""
    from mesh.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.model.loader import open_reader
    from mesh.types import SamplingParams
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (cfg_only / name).write_text((tiny["qwen3_moe"] / name).read_text())
    model, experts = load_model(cfg_only, torch.float32, load_format="dummy")
    again, _ = load_model(cfg_only, torch.float32, load_format="dummy")
    layer = model.w.layers[0]
    assert torch.equal(layer.input_norm, torch.ones_like(layer.input_norm))
    assert 0.015 < float(layer.attn.qkv.std()) < 0.025 and torch.equal(layer.attn.qkv, again.w.layers[0].attn.qkv)
    p = PRESETS["tiny"]
    assert experts.layers[0].gate_up.shape == (p.num_experts, 2 * p.moe_intermediate_size, p.hidden_size)
    other = open_reader(cfg_only, "dummy", seed=1).get("x.weight", (4, 4), torch.float32)
    assert not torch.equal(other, open_reader(cfg_only, "dummy", seed=0).get("x.weight", (4, 4), torch.float32))
    with pytest.raises(WeightError, match="no \\*.safetensors"):
        CheckpointReader(cfg_only)  # no weights on disk: only the dummy format loads it
    engine = Engine(cfg_only, EngineConfig(dtype="float32", load_format="dummy"))
    out = engine.generate([engine.make_request(prompt="def f(x):", sampling=SamplingParams(max_tokens=5,
                                                                                           ignore_eos=True))])[0]
    assert len(out.token_ids) == 5


def test_cli_config_only_and_dummy_flags(cache_env, tmp_path, capsys):
    """`mesh init-model --config-only`, then `mesh generate --load-format dummy`; without the flag the
    CLI names it instead of failing on the missing weights."""
    from mesh_cli import main
    out = tmp_path / "c"
    assert main(["init-model", "--preset", "tiny", "--config-only", "--out", str(out)]) == 0
    assert not list(out.glob("*.safetensors"))
    with pytest.raises(SystemExit, match="--load-format dummy"):
        main(["generate", "--model", str(out), "--prompt-ids", "1,2", "--device", "cpu"])
    assert main(["generate", "--model", str(out), "--prompt-ids", "1,2", "--max-tokens", "3", "--ignore-eos",
                 "--device", "cpu", "--dtype", "float32", "--load-format", "dummy", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    with pytest.raises(SystemExit, match="--preset coder-30b-a3b"):
        main(["init-model", "--preset", "coder-30b-a3b", "--out", str(tmp_path / "big")])
