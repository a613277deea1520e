"""Building a `MoEDecoder` and `ExpertShard`s from a Hugging Face model directory.

Every tensor's shape is checked against config.json, so a truncated or mismatched checkpoint fails at
load time with the tensor's name, not with a shape error deep inside a forward pass.

`load_format="dummy"` reads no weights at all: every tensor is made from config.json's shapes,
random, directly on the target device (for benchmarks and capacity tests of real model shapes whose
weights are not at hand, as vLLM's `--load-format dummy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mesh.config import ModelConfig
from mesh.model.backend import TorchBackend
from mesh.model.decoder import (AttentionWeights, DenseWeights, LayerWeights, LinearAttentionWeights,
                                MoEBlockWeights, MoEDecoder)
from mesh.model.families import FAMILIES
from mesh.model.moe import ExpertShard, ExpertWeights
from mesh.model.weights import CheckpointReader, DummyReader

LOAD_FORMATS = ("auto", "dummy")


def load_dense(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
               device: str | torch.device = "cpu", reader: CheckpointReader | DummyReader | None = None
               ) -> DenseWeights:
    r = reader or CheckpointReader(model_dir)
    spec = FAMILIES[cfg.family]
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D

    def get(name, shape):
        return r.get(name, shape, dtype).to(device)

    layers = []
    moe_index = kv_index = linear_index = 0

    def norm(name, size):
        if cfg.zero_centered_norm:  # Qwen3-Next: the norm scales by 1 + w, in float32, rounded once
            return (1.0 + r.get(name, (size,), torch.float32)).to(device)
        return get(name, (size,))

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = LayerWeights(input_norm=norm(p + "input_layernorm.weight", H),
                             post_norm=norm(p + "post_attention_layernorm.weight", H), attn=None, moe=None)
        if cfg.is_linear[i]:
            layer.linear, layer.cache_index = _linear_attention(cfg, p + "linear_attn.", get), linear_index
            linear_index += 1
        else:
            a = p + "self_attn."
            if cfg.attn_output_gate:  # q_proj rows per head: query (D) then gate (D); gate rows go last
                qg = get(a + "q_proj.weight", (2 * q, H)).view(cfg.num_heads, 2, D, H)
                q_rows, gate_rows = qg[:, 0].reshape(q, H), qg[:, 1].reshape(q, H)
            else:
                q_rows, gate_rows = get(a + "q_proj.weight", (q, H)), None
            layer.attn = AttentionWeights(
                qkv=torch.cat([q_rows, get(a + "k_proj.weight", (kv, H)), get(a + "v_proj.weight", (kv, H))]
                              + ([gate_rows] if gate_rows is not None else [])),
                qkv_bias=torch.cat([get(a + "q_proj.bias", (q,)), get(a + "k_proj.bias", (kv,)),
                                    get(a + "v_proj.bias", (kv,))]) if cfg.qkv_bias else None,
                o=get(a + "o_proj.weight", (H, q)),
                q_norm=norm(a + "q_norm.weight", D) if cfg.qk_norm else None,
                k_norm=norm(a + "k_norm.weight", D) if cfg.qk_norm else None,
                gated=cfg.attn_output_gate,
            )
            layer.cache_index = kv_index
            kv_index += 1
        if cfg.moe_layers[i]:
            m = p + spec.moe_prefix + "."
            block = MoEBlockWeights(router=get(spec.router_key(i), (cfg.num_experts, H)))
            if cfg.shared_expert_intermediate_size:
                Is = cfg.shared_expert_intermediate_size
                block.shared_gate_up = torch.cat([get(m + "shared_expert.gate_proj.weight", (Is, H)),
                                                  get(m + "shared_expert.up_proj.weight", (Is, H))])
                block.shared_down = get(m + "shared_expert.down_proj.weight", (H, Is))
                block.shared_gate = get(m + "shared_expert_gate.weight", (1, H))
            layer.moe, layer.moe_index = block, moe_index
            moe_index += 1
        else:
            I = cfg.intermediate_size
            layer.mlp_gate_up = torch.cat([get(p + "mlp.gate_proj.weight", (I, H)),
                                           get(p + "mlp.up_proj.weight", (I, H))])
            layer.mlp_down = get(p + "mlp.down_proj.weight", (H, I))
        layers.append(layer)
    embed = get("model.embed_tokens.weight", (V, H))
    if cfg.tie_word_embeddings and "lm_head.weight" not in r:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight", (V, H))
    return DenseWeights(embed=embed, layers=layers, norm=norm("model.norm.weight", H), lm_head=lm_head)


def _linear_attention(cfg: ModelConfig, prefix: str, get) -> LinearAttentionWeights:
    """A Gated DeltaNet layer: the checkpoint groups in_proj_qkvz's rows per key head (q, k, then the
    group's v and z) and in_proj_ba's per key head (b, a); regroup them into one projection whose
    output is [q | k | v | z | b | a]."""
    H = cfg.hidden_size
    hk, dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    hv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    rep = hv // hk
    qkvz = get(prefix + "in_proj_qkvz.weight", (2 * hk * dk + 2 * hv * dv, H)).view(hk, 2 * dk + 2 * rep * dv, H)
    q, k, v, z = torch.split(qkvz, [dk, dk, rep * dv, rep * dv], dim=1)
    ba = get(prefix + "in_proj_ba.weight", (2 * hv, H)).view(hk, 2 * rep, H)
    b, a = torch.split(ba, [rep, rep], dim=1)
    in_proj = torch.cat([x.reshape(-1, H) for x in (q, k, v, z, b, a)])
    conv_dim, kernel = cfg.linear_conv_dim, cfg.linear_conv_kernel_dim
    return LinearAttentionWeights(
        in_proj=in_proj, conv=get(prefix + "conv1d.weight", (conv_dim, 1, kernel)).view(conv_dim, kernel),
        dt_bias=get(prefix + "dt_bias", (hv,)), a_log=get(prefix + "A_log", (hv,)),
        norm=get(prefix + "norm.weight", (dv,)), out=get(prefix + "out_proj.weight", (H, hv * dv)),
        key_heads=hk, key_dim=dk, value_heads=hv, value_dim=dv)


def load_experts(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                 slots: Sequence[Sequence[int]] | None = None, device: str | torch.device = "cpu",
                 reader: CheckpointReader | DummyReader | None = None) -> ExpertShard:
    """Load the experts of every MoE layer; `slots[moe_index]` lists the logical expert held in each
    local slot (default: all experts, slot == expert). Only those tensors are read from disk."""
    r = reader or CheckpointReader(model_dir)
    spec = FAMILIES[cfg.family]
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    moe_layers = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    if slots is None:
        slots = [list(range(E)) for _ in moe_layers]
    if len(slots) != len(moe_layers):
        raise ValueError(f"slots has {len(slots)} layers, the model has {len(moe_layers)} MoE layers")
    out = []
    for layer, experts in zip(moe_layers, slots):
        for e in experts:
            if not 0 <= e < E:
                raise ValueError(f"expert {e} out of range [0, {E}) in layer {layer}")
        fused_gu, fused_d = spec.fused_keys(layer)
        if isinstance(r, DummyReader):  # made on the device at the shard's size, not the whole layer's
            gate_up = r.get(fused_gu, (len(experts), 2 * I, H), dtype)
            down = r.get(fused_d, (len(experts), H, I), dtype)
        elif fused_gu in r:
            idx = torch.tensor(list(experts), dtype=torch.long)
            gate_up = r.get(fused_gu, (E, 2 * I, H), dtype)[idx]
            down = r.get(fused_d, (E, H, I), dtype)[idx]
        else:
            gate_up = torch.stack([
                torch.cat([r.get(spec.expert_key(layer, e, spec.gate), (I, H), dtype),
                           r.get(spec.expert_key(layer, e, spec.up), (I, H), dtype)])
                for e in experts])  # [S, 2I, H]
            down = torch.stack([r.get(spec.expert_key(layer, e, spec.down), (H, I), dtype)
                                for e in experts])  # [S, H, I]
        out.append(ExpertWeights(gate_up=gate_up.contiguous().to(device), down=down.contiguous().to(device)))
    return ExpertShard(out)


def open_reader(model_dir: str | Path, load_format: str = "auto", device: str | torch.device = "cpu",
                seed: int = 0) -> CheckpointReader | DummyReader:
    """The checkpoint's tensors ("auto"), or random ones made on `device` ("dummy")."""
    if load_format == "dummy":
        return DummyReader(device, seed)
    if load_format != "auto":
        raise ValueError(f"load format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    return CheckpointReader(model_dir)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
               with_experts: bool = True, max_positions: int | None = None,
               backend: TorchBackend | None = None, load_format: str = "auto",
               ) -> tuple[MoEDecoder, ExpertShard | None]:
    """The dense model and (with_experts) every expert, both bound to `backend` (default: the torch
    reference)."""
    cfg = ModelConfig.from_dir(model_dir)
    backend = backend or TorchBackend(cfg.rms_norm_eps)
    reader = open_reader(model_dir, load_format, device)
    dense = load_dense(model_dir, cfg, dtype, device, reader)
    experts = load_experts(model_dir, cfg, dtype, device=device, reader=reader) if with_experts else None
    reader.close()
    if experts is not None:
        backend.prepare_experts(experts)
    return MoEDecoder(cfg, dense, dtype, device, max_positions, backend=backend), experts
