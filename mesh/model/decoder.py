"""The decoder, written once: embeddings, then per layer norm -> attention -> norm -> MoE block (router,
experts through the dispatcher, shared expert) or dense MLP, then the final norm and the lm_head.

Every operation comes from the backend chosen at construction (`mesh.model.backend`), so the same
layer runs the torch reference, the CPU kernels and the CUDA kernels. Sparse expert FFNs are reached
only through the dispatcher, so the same object runs the single-process engine (local dispatcher)
and the mesh gateway (collective dispatcher).

`forward` takes one or more micro-batches. With two, their layers interleave so that while one
micro-batch's rows are at the experts the other computes its attention; that is a schedule over the
same layer calls, not another copy of the layer (see `forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mesh.config import ModelConfig
from mesh.model.attention import AttentionMetadata, KVCache
from mesh.model.backend import Step, TorchBackend
from mesh.model.families import FAMILIES
from mesh.model.layers import RotaryTable
from mesh.model.dispatch import Dispatcher


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [(Hq + 2 Hk) * D, H]; gated: [(2 Hq + 2 Hk) * D, H], the gate's rows last
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hk) * D]
    o: torch.Tensor  # [H, Hq * D]
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None
    gated: bool = False  # output * sigmoid(gate) before o (Qwen3-Next)


@dataclass
class LinearAttentionWeights:
    """A Gated DeltaNet layer's weights, rows regrouped at load so that one projection yields
    [q (Hk*dk) | k (Hk*dk) | v (Hv*dv) | z (Hv*dv) | b (Hv) | a (Hv)] as contiguous blocks."""

    in_proj: torch.Tensor  # [2 Hk dk + 2 Hv dv + 2 Hv, H]
    conv: torch.Tensor  # [Hk dk * 2 + Hv dv, K] depthwise causal convolution over q, k, v
    dt_bias: torch.Tensor  # [Hv]
    a_log: torch.Tensor  # [Hv]
    norm: torch.Tensor  # [dv] the gated output norm's weight
    out: torch.Tensor  # [H, Hv dv]
    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int


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
    attn: AttentionWeights | None  # None: a linear-attention layer
    moe: MoEBlockWeights | None  # None: a dense MLP layer
    mlp_gate_up: torch.Tensor | None = None
    mlp_down: torch.Tensor | None = None
    moe_index: int = -1  # position among MoE layers (the dispatcher's layer id)
    linear: LinearAttentionWeights | None = None
    cache_index: int = -1  # position among the layers with a KV cache, or among linear layers' states


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H] (the embedding when tied)


@dataclass
class MicroBatch:
    """One micro-batch of a step: its inputs and, while the layers run, its residual stream."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    step: Step | None = None
    h: torch.Tensor | None = None  # [T, H] residual stream
    pending: torch.Tensor | None = None  # the last block's output, added to h with the next norm
    x: torch.Tensor | None = None  # the current MoE block's normed input, once computed


class MoEDecoder:
    def __init__(self, cfg: ModelConfig, weights: DenseWeights, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_positions: int | None = None,
                 backend: TorchBackend | None = None):
        self.cfg = cfg
        self.w = weights
        self.dtype = dtype
        self.device = torch.device(device)
        self.spec = FAMILIES[cfg.family]
        self.ops = backend or TorchBackend(cfg.rms_norm_eps)
        self.rope = RotaryTable(cfg.rope_dim, cfg.rope_theta, max_positions or cfg.max_position_embeddings,
                                dtype, device)
        self.scale = cfg.head_dim ** -0.5
        self.qk_norm = [None if layer.attn is None or layer.attn.q_norm is None
                        else (layer.attn.q_norm, layer.attn.k_norm) for layer in weights.layers]
        self.router_dtype = dtype if self.spec.router_weights_in_model_dtype else torch.float32
        self.ops.prepare_dense(weights, cfg)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, dispatcher: Dispatcher, capture: list | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, H].

        `capture`, when given, receives the residual stream after every layer (for parity tests).
        """
        return self.forward_micro_batches([MicroBatch(input_ids, positions, meta)], kv, dispatcher, capture)[0]

    @torch.inference_mode()
    def forward_micro_batches(self, parts: list[MicroBatch], kv: KVCache, dispatcher: Dispatcher,
                              capture: list | None = None) -> list[torch.Tensor]:
        """The layers over M micro-batches -> final-normed hidden [T_m, H] each.

        Per MoE layer i, micro-batch m dispatches its rows, then (while they are at the experts) the
        next piece of attention that does not wait for them runs, then m combines:
            M = 1: attn(0, i) | dispatch(0) | combine(0)
            M = 2: attn(0, i) | dispatch(0) | attn(1, i) | combine(0) | dispatch(1) | attn(0, i+1) | combine(1)
        which is also the order the expert ranks serve the collectives in (dispatch 0, combine 0,
        dispatch 1, combine 1 per layer).
        """
        layers, ops, m_count = self.w.layers, self.ops, len(parts)
        dispatcher.begin_step(sum(p.input_ids.shape[0] for p in parts), micro_batches=m_count)
        for p in parts:
            p.step = ops.begin_step(p.meta, p.positions, self.rope)
            p.h = ops.embed(p.input_ids, self.w.embed)  # [T, H]
        for i, layer in enumerate(layers):
            if layer.moe is None:  # a dense layer: no collectives, nothing to overlap
                for p in parts:
                    x, p.x = (p.x if p.x is not None else self._attention_block(i, p, kv)), None
                    p.pending = ops.mlp(x, layer.mlp_gate_up, layer.mlp_down)
            else:
                for m, p in enumerate(parts):
                    x, p.x = (p.x if p.x is not None else self._attention_block(i, p, kv)), None
                    handle, shared = self._moe_begin(layer, x, dispatcher, p.step)
                    # overlap the experts' round trip with attention that does not need its result
                    if m + 1 < m_count:
                        parts[m + 1].x = self._attention_block(i, parts[m + 1], kv)
                    elif m_count > 1 and i + 1 < len(layers) and layers[i + 1].moe is not None:
                        parts[0].x = self._attention_block(i + 1, parts[0], kv)  # 0 has finished layer i
                    out = dispatcher.combine(handle)
                    p.pending = out if shared is None else out + shared
            if capture is not None:  # the residual stream after the layer (one micro-batch)
                p = parts[0]
                p.h, p.pending = p.h + p.pending, None
                capture.append(p.h.clone())
        dispatcher.end_step()
        return [ops.add_rms_norm(p.h, p.pending, self.w.norm)[1] for p in parts]

    def _attention_block(self, i: int, p: MicroBatch, kv: KVCache) -> torch.Tensor:
        """Layer i's token mixer for micro-batch p: the pending residual add and input norm, attention
        (full, gated, or Gated DeltaNet), the residual add and post-attention norm; returns the
        MLP/MoE block's input [T, H]."""
        layer, ops = self.w.layers[i], self.ops
        p.h, x = ops.add_rms_norm(p.h, p.pending, layer.input_norm)
        p.pending = None
        if layer.linear is not None:
            w = layer.linear
            mixed = ops.linear_attention(p.step, layer.cache_index, ops.linear(x, w.in_proj), w, kv.states)
            out = ops.linear(mixed, w.out)  # [T, H]
        else:
            out = self._full_attention(i, layer, x, p, kv)
        p.h, x = ops.add_rms_norm(p.h, out, layer.post_norm)
        return x

    def _full_attention(self, i: int, layer: LayerWeights, x: torch.Tensor, p: MicroBatch, kv: KVCache) -> torch.Tensor:
        a, ops, cfg = layer.attn, self.ops, self.cfg
        qkv = ops.linear(x, a.qkv, a.qkv_bias)  # [T, (Hq + 2 Hk) * D] (+ [T, Hq * D] gate)
        width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        k_cache, v_cache = kv.layer(layer.cache_index)
        q = ops.qkv_norm_rope_write(p.step, i, qkv[:, :width], cfg.num_heads, self.qk_norm[i], k_cache,
                                    v_cache)  # [T, Hq, D]
        o = ops.attend(p.step, i, q, k_cache, v_cache, self.scale)  # [T, Hq * D]
        if a.gated:
            o = o * torch.sigmoid(qkv[:, width:])
        return ops.linear(o, a.o)

    def _moe_begin(self, layer: LayerWeights, x: torch.Tensor, dispatcher: Dispatcher, step: Step):
        """Route and dispatch; the shared expert runs while routed rows are away (overlapping the
        collective's transport). Returns (handle for combine, shared-expert output or None)."""
        m, cfg, ops = layer.moe, self.cfg, self.ops
        ids, weights = ops.route(step, ops.linear(x, m.router), cfg.top_k, cfg.norm_topk_prob, self.router_dtype)
        handle = dispatcher.dispatch(layer.moe_index, x, ids, weights)
        shared = None
        if m.shared_gate_up is not None:
            shared = ops.mlp(x, m.shared_gate_up, m.shared_down)
            shared = torch.sigmoid(ops.linear(x, m.shared_gate)) * shared
        return handle, shared

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (the model dtype's values, as transformers' logits.float())."""
        return self.ops.logits(hidden, self.w.lm_head)
