"""The CUDA backend: Triton kernels for everything between the dense projections (cuBLAS).

Per layer of a decode step: add + RMSNorm (one kernel), the qkv projection, q/k norm + rotary + the
K/V slot writes (one kernel), paged decode attention (one or two kernels), the o projection,
add + RMSNorm, the router projection, softmax + top-k + renormalisation (one kernel), and the fused
MoE (alignment, gate/up with SiLU, down with the routing weights, the combine). No operation reads a
value back to the host, so a decode step can be captured once in a CUDA graph and replayed
(`mesh.engine.cuda_graphs`); everything a kernel needs per step is prepared in `begin_step`.

The same kernels run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`), which is how the
test suite checks this backend on machines without a GPU (float32 there).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mesh.model.attention import AttentionMetadata
from mesh.model.backend import Step, TorchBackend
from mesh.model.cuda import attention as kattn
from mesh.model.cuda import fused_moe, ops
from mesh.model.layers import RotaryTable
from mesh.model.moe import ExpertShard, ExpertWeights

MOE_KERNELS = ("auto", "triton", "grouped_mm")


@functools.cache
def _fla():
    """fla-core's (chunked, fused recurrent) gated delta rule, or None where it is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


@dataclass
class _StepArgs:
    cos: torch.Tensor  # [P, D] the whole rotary table: the kernel reads each token's row itself
    sin: torch.Tensor
    table: torch.Tensor | None = None  # decode rows' block table [B, M] int32
    lens: torch.Tensor | None = None  # [B] int32
    splits: int = 1  # decode attention's split of each context
    prefill: object = None  # the prefill kernel's batch description (kattn.prefill_batch)


def interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class CudaBackend(TorchBackend):
    name = "cuda"

    def __init__(self, rms_norm_eps: float = 1e-6, moe_kernel: str = "auto"):
        super().__init__(rms_norm_eps)
        if moe_kernel not in MOE_KERNELS:
            raise ValueError(f"moe kernel must be one of {', '.join(MOE_KERNELS)}, got {moe_kernel!r}")
        # auto: the Triton kernel, measured faster than torch's grouped_mm on an H200 at every decode
        # batch (bench/gpu_serving.py prints both); grouped_mm stays selectable as the library baseline
        self.moe_kernel = "triton" if moe_kernel == "auto" else moe_kernel
        if torch.cuda.is_available() and not interpreted():
            self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        else:
            self.num_sms = 4  # the interpreter: few programs, and splits still exercised
        self.num_kv_heads = 1

    def __repr__(self) -> str:
        return f"CudaBackend(moe_kernel={self.moe_kernel!r})"

    # ---- load time -----------------------------------------------------------------------
    def prepare_dense(self, weights, cfg) -> None:
        self.num_kv_heads = cfg.num_kv_heads

    def prepare_experts(self, shard: ExpertShard) -> None:
        for w in shard.layers:
            w.gate_up, w.down = w.gate_up.contiguous(), w.down.contiguous()
        shard.backend = self

    # ---- per step --------------------------------------------------------------------------
    def begin_step(self, meta: AttentionMetadata, positions: torch.Tensor, rope: RotaryTable) -> Step:
        args = _StepArgs(rope.cos, rope.sin)
        if meta.num_decode:
            args.table = meta.decode_block_table.to(torch.int32)
            args.lens = meta.decode_context_lens.to(torch.int32)
            # from host values only (never the lengths on the device), so that a captured graph and
            # its replays agree on the grid
            longest = meta.max_decode_context or rope.max_positions
            args.splits = kattn.decode_splits(meta.num_decode, self.num_kv_heads, longest, self.num_sms)
        if meta.prefills:
            chunks = meta.prefills
            # the chunks' block lists as one padded table, copied on the device (no host round trip)
            table = torch.zeros(len(chunks), max(c.block_ids.numel() for c in chunks), dtype=torch.int32,
                                device=positions.device)
            for i, c in enumerate(chunks):
                table[i, :c.block_ids.numel()] = c.block_ids
            args.prefill = kattn.prefill_batch([c.start for c in chunks], [c.length for c in chunks],
                                               [c.context_len for c in chunks], table, positions.device)
        return Step(meta, positions, args=args)

    # ---- dense operations ------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().rms_norm(x, weight)
        return ops.add_rms_norm(x.contiguous(), None, weight, self.eps)[1]

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.add_rms_norm(h, delta, weight, self.eps)

    # ---- attention -------------------------------------------------------------------------
    def qkv_norm_rope_write(self, step: Step, layer: int, qkv: torch.Tensor, num_heads: int,
                            qk_norm, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        hk, d = k_cache.shape[0], k_cache.shape[-1]
        q_w, k_w = qk_norm if qk_norm is not None else (None, None)
        return kattn.qkv_norm_rope_write(qkv, num_heads, hk, d, q_w, k_w, self.eps, step.args.cos, step.args.sin,
                                         step.positions, step.args.cos.shape[-1], k_cache, v_cache,
                                         step.meta.slot_mapping)

    def attend(self, step: Step, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float) -> torch.Tensor:
        meta, args = step.meta, step.args
        t, hq, d = q.shape
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            kattn.paged_decode_attention(q[:nd], k_cache, v_cache, args.table, args.lens, scale, args.splits,
                                         out=out[:nd])
        if meta.prefills:
            kattn.paged_prefill_attention(q, k_cache, v_cache, args.prefill, scale, out=out)
        return out.view(t, hq * d)

    # ---- MoE -------------------------------------------------------------------------------
    def route(self, step: Step | None, logits: torch.Tensor, top_k: int, normalize: bool,
              weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if step is None:  # no step (an expert-side caller): every row is real
            slots = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        else:
            slots = step.meta.slot_mapping
        return ops.route(logits, slots, top_k, normalize, weights_dtype)

    def experts(self, w: ExpertWeights, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        if load is not None:  # on the device: the counters are read back only when someone asks
            ops.count_experts(topk_ids, load)
        if hidden.shape[0] == 0:
            return torch.empty_like(hidden)
        if self.moe_kernel == "grouped_mm" and hidden.is_cuda and hidden.dtype == torch.bfloat16:
            return fused_moe.grouped_mm_experts(hidden, w.gate_up, w.down, topk_ids, topk_weights)
        return fused_moe.fused_experts(hidden, w.gate_up, w.down, topk_ids, topk_weights)

    def grouped_experts(self, w: ExpertWeights, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if rows.shape[0] == 0:
            return torch.empty_like(rows)
        c = torch.tensor(counts, dtype=torch.int64).to(rows.device, non_blocking=True)
        slot_of_row = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), c,
                                              output_size=rows.shape[0])  # [N]
        return fused_moe.grouped_experts(rows, w.gate_up, w.down, slot_of_row)

    def logits(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, lm_head).float()

    # ---- Gated DeltaNet (hybrid models) ------------------------------------------------------
    # fla-core's Triton kernels for the gated delta rule where that package is installed (the `gpu`
    # extra) and the tensors are on a GPU; else the torch forms the base class runs.
    def delta_rule_step(self, q, k, v, g, beta, state):
        fla = _fla() if q.is_cuda else None
        if fla is None:
            return super().delta_rule_step(q, k, v, g, beta, state)
        b, rep = q.shape[0], v.shape[1] // q.shape[1]
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
        cu = torch.arange(b + 1, dtype=torch.int64, device=q.device)  # each sequence one token long
        o, s = fla[1](q[None], k[None], v[None], g=g.float()[None], beta=beta[None], initial_state=state,
                      output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
        return o[0].float(), s

    def delta_rule_chunk(self, q, k, v, g, beta, state, cuts):
        fla = _fla() if q.is_cuda else None
        if fla is None:
            return super().delta_rule_chunk(q, k, v, g, beta, state, cuts)
        t, rep = q.shape[0], v.shape[1] // q.shape[1]
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
        bounds = sorted({c for c in cuts if 0 < c < t}) + [t]
        out, s, at, start = torch.empty(t, *v.shape[1:], dtype=torch.float32, device=v.device), state, {}, 0
        for end in bounds:  # one call per piece between the states asked for
            o, s = fla[0](q[None, start:end], k[None, start:end], v[None, start:end], g=g.float()[None, start:end],
                          beta=beta[None, start:end], initial_state=s[None], output_final_state=True,
                          use_qk_l2norm_in_kernel=True)
            s = s[0]
            out[start:end], at[end], start = o[0].float(), s, end
        return out, s, [at.get(c, state) for c in cuts]
