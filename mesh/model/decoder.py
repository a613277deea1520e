"""The dense part of a MoE decoder (embeddings, attention, norms, router, shared expert, lm_head).

Sparse expert FFNs are reached only through the dispatcher, so the same object runs the
single-process engine (local dispatcher) and the mesh gateway (collective dispatcher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mesh.config import ModelConfig
from mesh.model.attention import AttentionMetadata, KVCache, paged_attention
from mesh.model.families import FAMILIES
from mesh.model.layers import RotaryTable, dense_mlp, rms_norm, rotate
from mesh.model.moe import route
from mesh.parallel.dispatcher import Dispatcher


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [(Hq + 2 Hk) * D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hk) * D]
    o: torch.Tensor  # [H, Hq * D]
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None


@dataclass
class MoEBlockWeights:
    router: torch.Tensor  # [E, H]
    shared_gate_up: torch.Tensor | None = None  # [2Is, H]
    shared_down: torch.Tensor | None = None  # [H, Is]
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: AttentionWeights
    moe: MoEBlockWeights | None  # None: a dense MLP layer
    mlp_gate_up: torch.Tensor | None = None
    mlp_down: torch.Tensor | None = None
    moe_index: int = -1  # position among MoE layers (the dispatcher's layer id)


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H] (the embedding when tied)


class MoEDecoder:
    def __init__(self, cfg: ModelConfig, weights: DenseWeights, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_positions: int | None = None):
        self.cfg = cfg
        self.w = weights
        self.dtype = dtype
        self.device = torch.device(device)
        self.spec = FAMILIES[cfg.family]
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, max_positions or cfg.max_position_embeddings,
                                dtype, device)
        self.scale = cfg.head_dim ** -0.5
        # q and k norms as one weight over the q and k heads side by side, so one norm and one rotary
        # pass cover both (the same per-element arithmetic as two separate passes).
        self.qk_norm = [None if layer.attn.q_norm is None else torch.cat(
            [layer.attn.q_norm.expand(cfg.num_heads, -1), layer.attn.k_norm.expand(cfg.num_kv_heads, -1)])
            for layer in weights.layers]  # [Hq + Hk, D] per layer

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, dispatcher: Dispatcher, capture: list | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, H].

        `capture`, when given, receives the residual stream after every layer (for parity tests).
        """
        dispatcher.begin_step(input_ids.shape[0])
        h = F.embedding(input_ids, self.w.embed)  # [T, H]
        rope = self.rope.at(positions)  # every layer rotates by the same positions
        for i, layer in enumerate(self.w.layers):
            h = h + self._attention(i, layer, rms_norm(h, layer.input_norm, self.cfg.rms_norm_eps),
                                    rope, meta, kv)
            x = rms_norm(h, layer.post_norm, self.cfg.rms_norm_eps)
            if layer.moe is None:
                h = h + dense_mlp(x, layer.mlp_gate_up, layer.mlp_down)
            else:
                h = h + self._moe(layer, x, dispatcher)
            if capture is not None:
                capture.append(h)
        dispatcher.end_step()
        return rms_norm(h, self.w.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32."""
        return F.linear(hidden, self.w.lm_head).float()

    def _attention(self, i: int, layer: LayerWeights, x: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        a, cfg = layer.attn, self.cfg
        hq, hk = cfg.num_heads, cfg.num_kv_heads
        qkv = F.linear(x, a.qkv, a.qkv_bias).view(x.shape[0], hq + 2 * hk, cfg.head_dim)  # [T, Hq+2Hk, D]
        qk, v = qkv[:, :hq + hk], qkv[:, hq + hk:]
        if self.qk_norm[i] is not None:
            qk = rms_norm(qk, self.qk_norm[i], cfg.rms_norm_eps)
        qk = rotate(qk, *rope)
        k_cache, v_cache = kv.layer(i)
        o = paged_attention(qk[:, :hq], qk[:, hq:], v, k_cache, v_cache, meta, self.scale)  # [T, Hq * D]
        return F.linear(o, a.o)

    def _moe(self, layer: LayerWeights, x: torch.Tensor, dispatcher: Dispatcher) -> torch.Tensor:
        m, cfg = layer.moe, self.cfg
        ids, weights = route(x, m.router, cfg.top_k, cfg.norm_topk_prob,
                             self.spec.router_weights_in_model_dtype)
        handle = dispatcher.dispatch(layer.moe_index, x, ids, weights)
        # The shared expert runs while routed rows are away (overlaps the collective's transport).
        shared = None
        if m.shared_gate_up is not None:
            shared = dense_mlp(x, m.shared_gate_up, m.shared_down)
            shared = torch.sigmoid(F.linear(x, m.shared_gate)) * shared
        out = dispatcher.combine(handle)
        return out if shared is None else out + shared
