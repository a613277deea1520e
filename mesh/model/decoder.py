"""The dense part of a MoE decoder (embeddings, attention, norms, router, shared expert, lm_head).

Sparse expert FFNs are reached only through the dispatcher, so the same object runs the
single-process engine (local dispatcher) and the mesh gateway (collective dispatcher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mesh.config import ModelConfig
from mesh.model import native
from mesh.model.attention import AttentionMetadata, KVCache, paged_attention
from mesh.model.families import FAMILIES
from mesh.model.layers import RotaryTable, rms_norm, rotate, silu_mul
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
        # On the CPU, the dense projections run in the native linear kernel from packed copies of their
        # weights (keyed by the weight tensor's id); weights it does not take keep F.linear.
        self._packed: dict[int, native.PackedLinear] = {}
        if self.device.type == "cpu" and native.enabled():
            dense = [weights.lm_head]
            for layer in weights.layers:
                dense += [layer.attn.qkv, layer.attn.o, layer.mlp_gate_up, layer.mlp_down]
                if layer.moe is not None:
                    dense += [layer.moe.router, layer.moe.shared_gate_up, layer.moe.shared_down]
            for t in dense:
                p = native.pack_linear(t) if t is not None else None
                if p is not None:
                    self._packed[id(t)] = p
        self._plan = self._native_plan()

    def _native_plan(self) -> list[tuple] | None:
        """Per layer, what the lean CPU path passes its kernels: the packed qkv (and its bias) and o
        projections, the packed router (None: F.linear, for expert counts that are not a multiple of
        16), the two norm weights and the q/k norm weights; None when a projection is not packed."""
        if not self._packed or self.dtype not in (torch.float32, torch.bfloat16):
            return None
        plan = []
        for i, layer in enumerate(self.w.layers):
            a = layer.attn
            qkv, o = self._packed.get(id(a.qkv)), self._packed.get(id(a.o))
            if qkv is None or o is None:
                return None
            router = self._packed.get(id(layer.moe.router)) if layer.moe is not None else None
            plan.append((qkv, a.qkv_bias, o, router, layer.input_norm, layer.post_norm, self.qk_norm[i]))
        return plan

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = self._packed.get(id(weight))
        if packed is not None and x.dim() == 2:
            out = native.linear(x, packed, bias)
            if out is not None:
                return out
        return F.linear(x, weight, bias)

    def _mlp(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """SwiGLU MLP (a dense layer's, or the shared expert): fused gate||up weight [2I, H], down [H, I]."""
        return self._linear(silu_mul(self._linear(x, gate_up)), down)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, dispatcher: Dispatcher, capture: list | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, H].

        `capture`, when given, receives the residual stream after every layer (for parity tests).
        """
        dispatcher.begin_step(input_ids.shape[0])
        h = F.embedding(input_ids, self.w.embed)  # [T, H]
        rope = self.rope.at(positions)  # every layer rotates by the same positions
        if capture is None and self._plan is not None and native.enabled() and input_ids.shape[0]:
            out = self._forward_native(h, rope, meta, kv, dispatcher)
            if out is not None:
                dispatcher.end_step()
                return out
        pending = None  # the last block's output, added to h together with the next norm
        for i, layer in enumerate(self.w.layers):
            h, x = self._add_norm(h, pending, layer.input_norm)
            h, x = self._add_norm(h, self._attention(i, layer, x, rope, meta, kv), layer.post_norm)
            if layer.moe is None:
                pending = self._mlp(x, layer.mlp_gate_up, layer.mlp_down)
            else:
                pending = self._moe(layer, x, dispatcher)
            if capture is not None:
                h, pending = h + pending, None
                capture.append(h)
        dispatcher.end_step()
        return self._add_norm(h, pending, self.w.norm)[1]

    def _forward_native(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                        kv: KVCache, dispatcher: Dispatcher) -> torch.Tensor | None:
        """The forward pass on the CPU kernels with one set of buffers and direct kernel calls (the
        general path's wrappers check and allocate per call: at a decode step's sizes their Python
        costs ~1 ms of a ~15 ms step). Same kernels, same order, same roundings as `forward` takes on
        the CPU. h [T, H] (the embeddings; updated in place) -> final-normed hidden [T, H]; None
        (nothing done) when the step does not fit it (the caller runs the general path)."""
        lib = native.library()
        cfg = self.cfg
        t, hd = h.shape
        hq, hk, d, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.top_k, cfg.num_experts
        cos, sin = rope
        if lib is None or d > 1024 or d % 2 or cos.dtype != h.dtype or h.dtype != self.dtype:
            return None
        bf16, threads, eps = int(h.dtype == torch.bfloat16), native._threads(), float(cfg.rms_norm_eps)
        x, attn = torch.empty_like(h), torch.empty_like(h)  # attn: the o projection's output, every layer
        qkv = h.new_empty(t, (hq + 2 * hk) * d)
        q = h.new_empty(t, hq, d)
        logits = h.new_empty(t, e)
        weights = torch.empty(t, k, dtype=h.dtype if self.spec.router_weights_in_model_dtype else torch.float32)
        w_bf16 = int(weights.dtype == torch.bfloat16)
        has_route = hasattr(lib, "mesh_route")
        ids = torch.empty(t, k, dtype=torch.int64)
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        local = getattr(dispatcher, "native_moe_args", None)  # the in-process dispatcher: one call per layer
        if local is not None:  # its kernel's buffers, shared by every layer
            moe_out = torch.empty_like(h)
            scratch_h = h.new_empty(t * k, cfg.moe_intermediate_size)
            scratch_y = h.new_empty(t * k, hd)
        decode_only = meta.num_decode == t and not meta.prefills
        if decode_only:  # the decode kernel's arguments, the same for every layer
            table = meta.decode_block_table.to(torch.int64).contiguous()
            lens = meta.decode_context_lens.to(torch.int64).contiguous()
            o_buf = h.new_empty(t, hq * d)
        hp, xp = h.data_ptr(), x.data_ptr()
        pending = None
        for i, layer in enumerate(self.w.layers):
            qkv_w, qkv_b, o_w, router_w, in_norm, post_norm, qk_norm = self._plan[i]
            if pending is None:
                lib.mesh_rms_norm(hp, t, 1, hd, 0, in_norm.data_ptr(), 0, xp, hd, eps, bf16, threads)
            else:  # h += pending (in place), x = norm(h)
                lib.mesh_add_rms_norm(hp, pending.data_ptr(), in_norm.data_ptr(), hp, xp, t, hd, eps, bf16, threads)
            lib.mesh_linear(xp, qkv_w.data.data_ptr(), None if qkv_b is None else qkv_b.data_ptr(), qkv.data_ptr(), t,
                            hd, qkv_w.out_features, bf16, threads, 0)
            k_cache, v_cache = kv.layer(i)
            n_slots = k_cache.shape[1] * k_cache.shape[2]
            if lib.mesh_qkv_rope_write(qkv.data_ptr(), t, hq, hk, (hq + 2 * hk) * d,
                                       None if qk_norm is None else qk_norm.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                       q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), n_slots, slots.data_ptr(),
                                       d, eps, bf16, threads) != 0:
                raise ValueError(f"KV slots outside the pool's {n_slots}")
            rc = -1
            if decode_only:
                o = o_buf
                rc = lib.mesh_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(),
                                               lens.data_ptr(), o.data_ptr(), t, hk, hq // hk, d, k_cache.shape[1],
                                               k_cache.shape[2], table.shape[1], float(self.scale), bf16, threads)
                if rc in (-4, -5):
                    raise (MemoryError if rc == -4 else ValueError)(
                        "decode attention: out of memory" if rc == -4 else
                        "decode attention: context lengths or block ids outside the block table / pool")
            if rc != 0:  # prefill chunks in the step, or sizes past the decode kernel's limits
                o = paged_attention(q, None, None, k_cache, v_cache, meta, self.scale)  # [T, Hq * D]
            lib.mesh_linear(o.data_ptr(), o_w.data.data_ptr(), None, attn.data_ptr(), t, hq * d, hd, bf16, threads, 0)
            lib.mesh_add_rms_norm(hp, attn.data_ptr(), post_norm.data_ptr(), hp, xp, t, hd, eps, bf16, threads)
            m = layer.moe
            if m is None:  # a dense MLP layer
                pending = self._mlp(x, layer.mlp_gate_up, layer.mlp_down)
                continue
            if router_w is not None:
                lib.mesh_linear(xp, router_w.data.data_ptr(), None, logits.data_ptr(), t, hd, e, bf16, threads, 0)
                router_logits = logits
            else:
                router_logits = F.linear(x, m.router)
            if has_route:  # as `route`: torch.topk's experts and order (csrc/topk.cpp), then the weights
                if lib.mesh_route(router_logits.data_ptr(), bf16, t, e, k, int(cfg.norm_topk_prob), ids.data_ptr(),
                                  weights.data_ptr(), w_bf16) == -4:
                    raise MemoryError("routing: out of memory")
            else:
                ids = torch.topk(router_logits, k, dim=-1).indices
                lib.mesh_route_weights(router_logits.data_ptr(), bf16, t, e, ids.data_ptr(), k,
                                       int(cfg.norm_topk_prob), weights.data_ptr(), w_bf16)
            args = local(layer.moe_index) if local is not None else None
            pending = None
            if args is not None:
                gu, dn, n_slots, inter, load = args
                rc = lib.mesh_moe_local(xp, t, ids.data_ptr(), weights.data_ptr(), 1 - w_bf16, k, gu, dn, n_slots, hd,
                                        inter, bf16, scratch_h.data_ptr(), scratch_y.data_ptr(), moe_out.data_ptr(),
                                        load, threads)
                if rc == -4:
                    raise MemoryError("moe kernel: out of memory")
                pending = moe_out if rc == 0 else None
            if pending is None:  # another dispatcher (the mesh's collective one): its two verbs
                handle = dispatcher.dispatch(layer.moe_index, x, ids, weights)
            if m.shared_gate_up is not None:
                shared = self._mlp(x, m.shared_gate_up, m.shared_down)
                shared = torch.sigmoid(F.linear(x, m.shared_gate)) * shared
            if pending is None:
                pending = dispatcher.combine(handle)
            if m.shared_gate_up is not None:
                pending = pending + shared
        out = torch.empty_like(h)
        lib.mesh_add_rms_norm(hp, pending.data_ptr(), self.w.norm.data_ptr(), hp, out.data_ptr(), t, hd, eps, bf16,
                              threads)
        return out

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
        """(h + delta, rms_norm(h + delta)): the residual add and the next norm, in one native pass on
        the CPU (the same roundings as the two torch ops)."""
        eps = self.cfg.rms_norm_eps
        if delta is None:
            return h, rms_norm(h, weight, eps)
        fused = native.add_rms_norm(h, delta, weight, eps) if native.enabled() else None
        if fused is not None:
            return fused
        h = h + delta
        return h, rms_norm(h, weight, eps)

    @torch.inference_mode()
    def forward_micro_batches(self, parts: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                              kv: KVCache, dispatcher: Dispatcher) -> list[torch.Tensor]:
        """Two micro-batches in flight: while one's rows are at the experts, the gateway computes the
        other's attention. parts: [(input_ids [T_m], positions [T_m], meta_m)] x 2 -> hidden [T_m, H].

        Per MoE layer i the collectives run in the order the expert ranks serve them (dispatch 0,
        combine 0, dispatch 1, combine 1), with the other micro-batch's work in between:
            attn(0, i) | dispatch(0) | attn(1, i) | combine(0) | dispatch(1) | attn(0, i+1) | combine(1)
        """
        assert len(parts) == 2
        dispatcher.begin_step(sum(p[0].shape[0] for p in parts), micro_batches=2)
        h = [F.embedding(ids, self.w.embed) for ids, _, _ in parts]  # [T_m, H] each
        ropes = [self.rope.at(pos) for _, pos, _ in parts]
        eps = self.cfg.rms_norm_eps

        def attn(m: int, i: int) -> torch.Tensor:
            layer = self.w.layers[i]
            h[m] = h[m] + self._attention(i, layer, rms_norm(h[m], layer.input_norm, eps), ropes[m],
                                          parts[m][2], kv)
            return rms_norm(h[m], layer.post_norm, eps)

        def finish(m: int, pending) -> None:
            handle, shared = pending
            out = dispatcher.combine(handle)
            h[m] = h[m] + (out if shared is None else out + shared)

        layers = self.w.layers
        ahead = None  # micro-batch 0's input to the next MoE block, computed early
        for i, layer in enumerate(layers):
            if layer.moe is None:  # dense layer: no collectives, nothing to overlap
                for m in (0, 1):
                    x = attn(m, i)
                    h[m] = h[m] + self._mlp(x, layer.mlp_gate_up, layer.mlp_down)
                continue
            x0 = ahead if ahead is not None else attn(0, i)
            ahead = None
            d0 = self._moe_begin(layer, x0, dispatcher)
            x1 = attn(1, i)  # overlaps the experts computing micro-batch 0
            finish(0, d0)
            d1 = self._moe_begin(layer, x1, dispatcher)
            if i + 1 < len(layers) and layers[i + 1].moe is not None:
                ahead = attn(0, i + 1)  # overlaps the experts computing micro-batch 1
            finish(1, d1)
        dispatcher.end_step()
        return [rms_norm(x, self.w.norm, eps) for x in h]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (the model dtype's values, as transformers' logits.float())."""
        packed = self._packed.get(id(self.w.lm_head))
        if packed is not None:
            out = native.linear(hidden, packed, out_float32=True)
            if out is not None:
                return out
        return F.linear(hidden, self.w.lm_head).float()

    def _attention(self, i: int, layer: LayerWeights, x: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        a, cfg = layer.attn, self.cfg
        hq, hk = cfg.num_heads, cfg.num_kv_heads
        qkv = self._linear(x, a.qkv, a.qkv_bias).view(x.shape[0], hq + 2 * hk, cfg.head_dim)  # [T, Hq+2Hk, D]
        k_cache, v_cache = kv.layer(i)
        q = native.qkv_rope_write(qkv, hq, self.qk_norm[i], *rope, cfg.rms_norm_eps, k_cache, v_cache,
                                  meta.slot_mapping) if native.enabled() else None
        if q is not None:  # the CPU: norms, rotation and the K/V slot writes in one pass over the heads
            o = paged_attention(q, None, None, k_cache, v_cache, meta, self.scale)  # [T, Hq * D]
            return self._linear(o, a.o)
        qk, v = qkv[:, :hq + hk], qkv[:, hq + hk:]
        if self.qk_norm[i] is not None:
            qk = rms_norm(qk, self.qk_norm[i], cfg.rms_norm_eps)
        qk = rotate(qk, *rope)
        o = paged_attention(qk[:, :hq], qk[:, hq:], v, k_cache, v_cache, meta, self.scale)
        return self._linear(o, a.o)

    def _moe(self, layer: LayerWeights, x: torch.Tensor, dispatcher: Dispatcher) -> torch.Tensor:
        handle, shared = self._moe_begin(layer, x, dispatcher)
        out = dispatcher.combine(handle)
        return out if shared is None else out + shared

    def _moe_begin(self, layer: LayerWeights, x: torch.Tensor, dispatcher: Dispatcher):
        """Route and dispatch; the shared expert runs while routed rows are away (overlapping the
        collective's transport). Returns (handle for combine, shared-expert output or None)."""
        m, cfg = layer.moe, self.cfg
        ids, weights = route(x, m.router, cfg.top_k, cfg.norm_topk_prob,
                             self.spec.router_weights_in_model_dtype, logits=self._linear(x, m.router))
        handle = dispatcher.dispatch(layer.moe_index, x, ids, weights)
        shared = None
        if m.shared_gate_up is not None:
            shared = self._mlp(x, m.shared_gate_up, m.shared_down)
            shared = torch.sigmoid(F.linear(x, m.shared_gate)) * shared
        return handle, shared
