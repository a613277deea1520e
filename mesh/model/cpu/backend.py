"""The CPU backend: the model's operations on the C kernels of `native`.

Each operation calls its kernel directly with raw pointers (the wrappers in `native` check and
allocate per call; at a decode step's sizes their Python cost was ~1 ms of a ~15 ms step). Which
operations a kernel takes is decided once: projections are packed at load (`prepare_dense`; a weight
the linear kernel does not take keeps F.linear), experts at load (`prepare_experts`, which drops the
stacked copies so each weight is held once), and the step's attention arguments in `begin_step`.
Everything a kernel does not take runs the torch reference op. Each kernel rounds where the torch op
it replaces rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mesh.model.attention import AttentionMetadata, paged_attention
from mesh.model.backend import Step, TorchBackend
from mesh.model.cpu import native
from mesh.model.layers import RotaryTable
from mesh.model.moe import ExpertShard, ExpertWeights

_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class _StepArgs:
    slots: torch.Tensor  # [T] int64 contiguous
    table: torch.Tensor | None = None  # decode rows' [B, M] int64 contiguous
    lens: torch.Tensor | None = None  # [B] int64
    spans: tuple[torch.Tensor, torch.Tensor] | None = None  # native.prefill_spans of the prefill chunks


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, rms_norm_eps: float = 1e-6, threads: int = 0):
        super().__init__(rms_norm_eps)
        self.lib = native.library()
        if self.lib is None:
            raise RuntimeError("the CPU kernels did not build (is a C compiler installed?)")
        self.threads = threads if threads > 0 else native.default_threads()
        self.has_route = hasattr(self.lib, "mesh_route")  # the C++ top-k built
        self._packed: dict[int, native.PackedLinear] = {}  # id(weight) -> packed copy
        self._qk_norm: list[torch.Tensor | None] = []  # per layer: q and k norm weights as [Hq + Hk, D]
        self._fused_qkv = False  # the norm + rotary + KV write kernel takes this model
        self._buffers: dict[str, torch.Tensor] = {}  # scratch of the expert kernel, reused between calls

    def __repr__(self) -> str:
        return f"CpuBackend(threads={self.threads}, bf16_products={native.bf16_products()})"

    # ---- load time -----------------------------------------------------------------------
    def prepare_dense(self, weights, cfg) -> None:
        dense = [weights.lm_head]
        for layer in weights.layers:
            dense += [layer.mlp_gate_up, layer.mlp_down]
            if layer.attn is not None:
                dense += [layer.attn.qkv, layer.attn.o]
            if layer.linear is not None:
                dense += [layer.linear.in_proj, layer.linear.out]
            if layer.moe is not None:
                dense += [layer.moe.router, layer.moe.shared_gate_up, layer.moe.shared_down]
        for t in dense:
            p = native.pack_linear(t) if t is not None else None
            if p is not None:
                self._packed[id(t)] = p
        d, dtype = cfg.head_dim, weights.embed.dtype
        attn = [layer.attn for layer in weights.layers if layer.attn is not None]
        # the kernel rotates whole heads and scales norms in the model dtype: not partial rotary, nor
        # float32 (zero-centred) norm weights in a bf16 model
        self._fused_qkv = dtype in _DTYPES and d % 2 == 0 and d <= 1024 and cfg.rope_dim == d and all(
            a.q_norm is None or a.q_norm.dtype == dtype for a in attn)
        self._qk_norm = [None if layer.attn is None or layer.attn.q_norm is None else torch.cat(
            [layer.attn.q_norm.expand(cfg.num_heads, -1), layer.attn.k_norm.expand(cfg.num_kv_heads, -1)])
            for layer in weights.layers]  # one weight over the q and k heads side by side

    def prepare_experts(self, shard: ExpertShard) -> None:
        for w in shard.layers:
            if w.gate_up is not None and native.experts_supported(w.gate_up, w.down):
                w.prepared = native.pack_experts(w.gate_up, w.down)
                w.gate_up = w.down = None  # held once, packed
        shard.backend = self

    # ---- per step --------------------------------------------------------------------------
    def begin_step(self, meta: AttentionMetadata, positions: torch.Tensor, rope: RotaryTable) -> Step:
        step = super().begin_step(meta, positions, rope)
        args = _StepArgs(meta.slot_mapping.to(torch.int64).contiguous())
        if meta.num_decode:
            args.table = meta.decode_block_table.to(torch.int64).contiguous()
            args.lens = meta.decode_context_lens.to(torch.int64).contiguous()
        if meta.prefills:
            args.spans = native.prefill_spans(meta.prefills)
        step.args = args
        return step

    # ---- dense operations ------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x, weight, self.eps)
        return out if out is not None else super().rms_norm(x, weight)

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if h.dtype not in _DTYPES or h.dim() != 2 or weight.dtype != h.dtype or not h.is_contiguous():
            return super().add_rms_norm(h, delta, weight)
        t, d = h.shape
        x = torch.empty_like(h)
        bf16 = int(h.dtype == torch.bfloat16)
        if delta is None:
            self.lib.mesh_rms_norm(h.data_ptr(), t, 1, d, 0, weight.data_ptr(), 0, x.data_ptr(), d, self.eps, bf16,
                                   self.threads)
            return h, x
        if delta.dtype != h.dtype or delta.shape != h.shape:
            return super().add_rms_norm(h, delta, weight)
        delta = delta.contiguous()  # h += delta in place: h is the forward pass's own residual stream
        self.lib.mesh_add_rms_norm(h.data_ptr(), delta.data_ptr(), weight.data_ptr(), h.data_ptr(), x.data_ptr(), t, d,
                                   self.eps, bf16, self.threads)
        return h, x

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = self._packed.get(id(weight))
        if packed is not None and x.dim() == 2 and x.dtype == packed.dtype and x.stride(1) == 1 \
                and x.stride(0) == x.shape[1] and (bias is None or bias.dtype == x.dtype):
            m, k = x.shape
            out = x.new_empty(m, packed.out_features)
            rc = self.lib.mesh_linear(x.data_ptr(), packed.data.data_ptr(), None if bias is None else bias.data_ptr(),
                                      out.data_ptr(), m, k, packed.out_features, int(x.dtype == torch.bfloat16),
                                      self.threads, 0)
            if rc == 0:
                return out
            if rc == -4:
                raise MemoryError("linear kernel: out of memory")
        return F.linear(x, weight, bias)

    def logits(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(id(lm_head))
        if packed is not None:
            out = native.linear(hidden, packed, out_float32=True)
            if out is not None:
                return out
        return super().logits(hidden, lm_head)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        out = native.argmax_rows(logits)
        return out if out is not None else super().argmax(logits)

    # ---- attention -------------------------------------------------------------------------
    def qkv_norm_rope_write(self, step: Step, layer: int, qkv: torch.Tensor, num_heads: int,
                            qk_norm, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        if not self._fused_qkv or qkv.dtype != k_cache.dtype or qkv.dtype != step.cos.dtype or qkv.stride(1) != 1:
            return super().qkv_norm_rope_write(step, layer, qkv, num_heads, qk_norm, k_cache, v_cache)
        hk, n, bs, d = k_cache.shape
        t = qkv.shape[0]
        q = qkv.new_empty(t, num_heads, d)
        w = self._qk_norm[layer] if qk_norm is not None else None
        if self.lib.mesh_qkv_rope_write(qkv.data_ptr(), t, num_heads, hk, qkv.stride(0),
                                        None if w is None else w.data_ptr(), step.cos.data_ptr(), step.sin.data_ptr(),
                                        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), n * bs,
                                        step.args.slots.data_ptr(), d, self.eps, int(qkv.dtype == torch.bfloat16),
                                        self.threads) != 0:
            raise ValueError(f"KV slots outside the pool's {n * bs}")
        return q

    def attend(self, step: Step, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float) -> torch.Tensor:
        meta, args = step.meta, step.args
        t, hq, d = q.shape
        hk, n, bs, _ = k_cache.shape
        if meta.num_decode == t and q.dtype in _DTYPES and q.dtype == k_cache.dtype:  # decode rows only
            o = q.new_empty(t, hq * d)
            rc = self.lib.mesh_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                                args.table.data_ptr(), args.lens.data_ptr(), o.data_ptr(), t, hk,
                                                hq // hk, d, n, bs, args.table.shape[1], scale,
                                                int(q.dtype == torch.bfloat16), self.threads)
            if rc in (-4, -5):
                raise (MemoryError if rc == -4 else ValueError)(
                    "decode attention: out of memory" if rc == -4 else
                    "decode attention: context lengths or block ids outside the block table / pool")
            if rc == 0:
                return o
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            dec = native.decode_attention(q[:nd], k_cache, v_cache, args.table, args.lens, scale)
            if dec is None:
                return paged_attention(q, k_cache, v_cache, meta, scale)
            out[:nd] = dec
        if meta.prefills and not native.prefill_attention(q, k_cache, v_cache, meta.prefills, scale, out,
                                                          args.spans):
            return paged_attention(q, k_cache, v_cache, meta, scale)
        return out.view(t, hq * d)

    # ---- MoE -------------------------------------------------------------------------------
    def route(self, step: Step | None, logits: torch.Tensor, top_k: int, normalize: bool,
              weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.topk's experts and order (csrc/topk.cpp), then the weights, in one call
        if self.has_route and logits.dtype in _DTYPES and weights_dtype in _DTYPES and logits.is_contiguous() \
                and 1 <= top_k <= min(logits.shape[1], 64):
            t, e = logits.shape
            ids = torch.empty(t, top_k, dtype=torch.int64)
            weights = torch.empty(t, top_k, dtype=weights_dtype)
            rc = self.lib.mesh_route(logits.data_ptr(), int(logits.dtype == torch.bfloat16), t, e, top_k,
                                     int(normalize), ids.data_ptr(), weights.data_ptr(),
                                     int(weights_dtype == torch.bfloat16))
            if rc == -4:
                raise MemoryError("routing: out of memory")
            if rc == 0:
                return ids, weights
        ids = torch.topk(logits, top_k, dim=-1).indices  # softmax is monotonic: the same experts
        weights = native.route_weights(logits, ids, normalize, weights_dtype)
        if weights is not None:
            return ids, weights
        return super().route(step, logits, top_k, normalize, weights_dtype)

    def experts(self, w: ExpertWeights, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        t = hidden.shape[0]
        if w.prepared is not None and t and hidden.is_contiguous() \
                and topk_weights.dtype in (torch.float32, hidden.dtype):  # sort, experts and combine in one call
            gu, dn = w.prepared
            if load is None:
                load = torch.zeros(gu.shape[0], dtype=torch.int64)
            k, inter = topk_ids.shape[1], self._inter(w)
            ids = topk_ids if topk_ids.dtype == torch.int64 and topk_ids.is_contiguous() else \
                topk_ids.to(torch.int64).contiguous()
            weights = topk_weights.contiguous()
            out = torch.empty_like(hidden)
            # scratch the kernel leaves dead after the call: kept and reused while the sizes stay
            scratch_h = self._scratch("h", (t * k, inter), hidden.dtype)
            scratch_y = self._scratch("y", (t * k, hidden.shape[1]), hidden.dtype)
            rc = self.lib.mesh_moe_local(hidden.data_ptr(), t, ids.data_ptr(), weights.data_ptr(),
                                         int(weights.dtype == torch.float32), k, gu.data_ptr(), dn.data_ptr(),
                                         gu.shape[0], hidden.shape[1], inter, int(hidden.dtype == torch.bfloat16),
                                         scratch_h.data_ptr(), scratch_y.data_ptr(), out.data_ptr(), load.data_ptr(),
                                         self.threads)
            if rc == -2:
                raise ValueError(f"expert ids outside [0, {gu.shape[0]})")
            if rc == -4:
                raise MemoryError("moe kernel: out of memory")
            if rc == 0:
                return out
        gate_up, down = self._stacked(w)
        return super().experts(ExpertWeights(gate_up, down), hidden, topk_ids, topk_weights, load)

    def grouped_experts(self, w: ExpertWeights, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if w.prepared is not None and rows.shape[0]:
            out = native.moe_experts(rows, counts, w.prepared, self._inter(w))
            if out is not None:
                return out
        gate_up, down = self._stacked(w)
        return super().grouped_experts(ExpertWeights(gate_up, down), rows, counts)

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype)
        return buf

    @staticmethod
    def _inter(w: ExpertWeights) -> int:
        """The intermediate size of packed experts (down packed [S, H/32, I(/2), ...])."""
        dn = w.prepared[1]
        return dn.shape[2] * (2 if dn.dtype == torch.bfloat16 else 1)

    @staticmethod
    def _stacked(w: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down), rebuilt from the packed copies when those are all that is held (a shape the
        kernel declines at run time: the torch ops run)."""
        if w.gate_up is None:
            return native.unpack_experts(*w.prepared)
        return w.gate_up, w.down
