"""Backends: the operations a decoder layer is made of, chosen once per engine.

The layer itself (`mesh.model.decoder`) is written once as the sequence of operations it performs;
a backend supplies them:

- `torch` (this module): torch ops on any device, written to reproduce transformers' numerics
  operation for operation. The reference every other backend is tested against.
- `cpu` (`mesh.model.cpu`): the C kernels, for CPU tensors (float32, bfloat16).
- `cuda` (`mesh.model.cuda`): Triton kernels (fused MoE, paged attention, fused norms and rotary)
  and cuBLAS for the dense projections; every decode step free of host synchronisation, so it can be
  captured in a CUDA graph.

The faster backends subclass `TorchBackend` and override what they have kernels for, so an operation
a kernel does not take (a shape past its limits) falls back to the reference op, per operation, on
decisions made once at load (`prepare_*`) or once per step (`begin_step`), never per layer.

Per step, `begin_step` turns the runner's `AttentionMetadata` into a `Step`: everything the layers
share (rotary rows for the step's positions, the kernels' attention arguments), built before the first
layer so layers never derive metadata themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mesh.model import attention as ref_attention
from mesh.model import linear_attention as gdn
from mesh.model import moe as ref_moe
from mesh.model.attention import AttentionMetadata
from mesh.model.layers import RotaryTable, rms_norm, rotate, silu_mul

BACKENDS = ("auto", "torch", "cpu", "cuda")


@dataclass
class Step:
    """What every layer of one forward pass shares."""

    meta: AttentionMetadata
    positions: torch.Tensor  # [T]
    cos: torch.Tensor | None = None  # [T, 1, D] rotary rows for the step's positions (torch, cpu)
    sin: torch.Tensor | None = None
    args: Any = None  # backend-specific per-step arguments


class TorchBackend:
    """The reference backend: torch ops only, any device."""

    name = "torch"

    def __init__(self, rms_norm_eps: float = 1e-6):
        self.eps = float(rms_norm_eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- load time -----------------------------------------------------------------------
    def prepare_dense(self, weights, cfg) -> None:
        """Called once with the model's DenseWeights and ModelConfig (a backend may repack the
        projections)."""

    def prepare_experts(self, shard: ref_moe.ExpertShard) -> None:
        """Called once with the experts this process holds; binds this backend to compute them."""
        shard.backend = self

    # ---- per step --------------------------------------------------------------------------
    def begin_step(self, meta: AttentionMetadata, positions: torch.Tensor, rope: RotaryTable) -> Step:
        cos, sin = rope.at(positions)
        return Step(meta, positions, cos, sin)

    # ---- dense operations ------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, table)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps)

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rms_norm(h + delta)): the residual add and the next norm. `h` may be updated
        in place (it is the forward pass's own residual stream); use the h returned."""
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, self.eps)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul(gate_up)

    def mlp(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """SwiGLU MLP (a dense layer's, or a shared expert): fused gate||up weight [2I, H], down [H, I]."""
        return self.linear(self.silu_mul(self.linear(x, gate_up)), down)

    def logits(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (the model dtype's values, as transformers' logits.float())."""
        return F.linear(hidden, lm_head).float()

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    # ---- attention -------------------------------------------------------------------------
    def qkv_norm_rope_write(self, step: Step, layer: int, qkv: torch.Tensor, num_heads: int,
                            qk_norm: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
                            v_cache: torch.Tensor) -> torch.Tensor:
        """The fused projection's output qkv [T, (Hq + 2 Hk) * D] -> q [T, Hq, D]: q and k heads through
        their RMSNorm (qk_norm = (q weight [D], k weight [D]), or None) and the rotary embedding, the
        new k and v written into their pool slots (caches [Hk, N, bs, D]; negative slots skipped)."""
        hk, d = k_cache.shape[0], k_cache.shape[-1]
        t = qkv.shape[0]
        qkv = qkv.view(t, num_heads + 2 * hk, d)
        q, k, v = qkv[:, :num_heads], qkv[:, num_heads:num_heads + hk], qkv[:, num_heads + hk:]
        if qk_norm is not None:
            q, k = rms_norm(q, qk_norm[0], self.eps), rms_norm(k, qk_norm[1], self.eps)
        q, k = rotate(q, step.cos, step.sin), rotate(k, step.cos, step.sin)
        ref_attention.kv_write(k_cache, v_cache, step.meta.slot_mapping, k, v)
        return q

    def attend(self, step: Step, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [T, Hq, D] over the paged cache (the step's K/V already written) -> [T, Hq * D]."""
        return ref_attention.paged_attention(q, k_cache, v_cache, step.meta, scale)

    def linear_attention(self, step: Step, layer: int, proj: torch.Tensor, w, states: gdn.StatePool) -> torch.Tensor:
        """A Gated DeltaNet layer between its projections: proj [T, 2 Hk dk + 2 Hv dv + 2 Hv] (q, k, v,
        z, b, a) -> [T, Hv dv] (the gated norm's output), reading and updating each sequence's states in
        `states` (layer `layer` of the pool) and writing the snapshots the step asks for. Decode rows
        take the recurrent form, all at once; each prefill chunk the chunked form."""
        meta = step.meta
        t = proj.shape[0]
        hk, dk, hv, dv = w.key_heads, w.key_dim, w.value_heads, w.value_dim
        kd, vd = hk * dk, hv * dv
        mixed, z, b, a = torch.split(proj, [2 * kd + vd, vd, hv, hv], dim=1)
        beta = b.sigmoid()
        g = -w.a_log.float().exp() * F.softplus(a.float() + w.dt_bias)  # [T, Hv] log decay, float32
        conv, ssm = states.conv[layer], states.ssm[layer]  # [S, C, K-1], [S, Hv, dk, dv]
        out = proj.new_empty(t, hv, dv)
        nd = meta.num_decode
        if nd:
            slots = meta.decode_state_slots
            x, conv_new = gdn.conv_step(mixed[:nd], w.conv, conv.index_select(0, slots))
            conv.index_copy_(0, slots, conv_new)
            q, k, v = torch.split(x, [kd, kd, vd], dim=1)
            o, s = self.delta_rule_step(q.view(nd, hk, dk), k.view(nd, hk, dk), v.view(nd, hv, dv), g[:nd], beta[:nd],
                                        ssm.index_select(0, slots))
            ssm.index_copy_(0, slots, s)
            out[:nd] = o.to(out.dtype)
        for i, chunk in enumerate(meta.prefills):
            slot, rows = meta.state_slots[nd + i], slice(chunk.start, chunk.start + chunk.length)
            snaps = meta.snapshots[i] if i < len(meta.snapshots) else []
            cuts = [n for n, _ in snaps]
            raw = mixed[rows]
            x, conv_new = gdn.causal_conv(raw, w.conv, conv[slot])
            conv_snaps = gdn.conv_states_at(raw, conv[slot], cuts)
            q, k, v = torch.split(x, [kd, kd, vd], dim=1)
            n = chunk.length
            o, s, ssm_snaps = self.delta_rule_chunk(q.reshape(n, hk, dk), k.reshape(n, hk, dk), v.reshape(n, hv, dv),
                                                    g[rows], beta[rows], ssm[slot].clone(), cuts)
            conv[slot], ssm[slot] = conv_new, s
            for (_, snap), c_state, s_state in zip(snaps, conv_snaps, ssm_snaps):
                conv[snap], ssm[snap] = c_state, s_state
            out[rows] = o.to(out.dtype)
        return gdn.gated_norm(out, z.reshape(t, hv, dv), w.norm, self.eps).reshape(t, vd)

    def delta_rule_step(self, q, k, v, g, beta, state):
        """The gated delta rule for one token per sequence (`linear_attention.recurrent`)."""
        return gdn.recurrent(q, k, v, g, beta, state)

    def delta_rule_chunk(self, q, k, v, g, beta, state, cuts):
        """The gated delta rule over one sequence's chunk, with the states at `cuts`
        (`linear_attention.chunked`)."""
        return gdn.chunked(q, k, v, g, beta, state, cuts)

    # ---- MoE -------------------------------------------------------------------------------
    def route(self, step: Step | None, logits: torch.Tensor, top_k: int, normalize: bool,
              weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] in weights_dtype).
        (A backend that runs fixed-size padded batches marks padding rows' ids -1: the experts port
        skips them.)"""
        return ref_moe.route(logits, top_k, normalize, weights_dtype)

    def experts(self, w: ref_moe.ExpertWeights, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        """The experts port, in-process: hidden [T, H], topk ids/weights [T, K] -> [T, H]."""
        return ref_moe.local_experts(w.gate_up, w.down, hidden, topk_ids, topk_weights, load)

    def grouped_experts(self, w: ref_moe.ExpertWeights, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts port on an expert worker: rows [N, H] grouped by local slot -> [N, H] unweighted."""
        return ref_moe.grouped_experts(w.gate_up, w.down, rows, counts)


def resolve_backend(name: str, device: str | torch.device) -> str:
    """The backend `auto` means on this device: cuda on a GPU (where Triton imports), cpu on the CPU
    (where the C kernels build, unless MESH_NATIVE_KERNELS=0), else torch."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    dev = torch.device(device)
    if name == "auto":
        if dev.type == "cuda":
            return "cuda" if _triton_available() else "torch"
        if dev.type == "cpu" and os.environ.get("MESH_NATIVE_KERNELS", "1") != "0":
            from mesh.model.cpu import native
            return "cpu" if native.library() is not None else "torch"
        return "torch"
    if name == "cuda" and dev.type != "cuda" and not (dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"the cuda backend runs on a CUDA device, not {dev} (on the CPU only in Triton's "
                         f"interpreter, TRITON_INTERPRET=1, for tests)")
    if name == "cpu" and dev.type != "cpu":
        raise ValueError(f"the cpu backend runs on the CPU, not {dev}")
    if name == "cpu":
        from mesh.model.cpu import native
        if native.library() is None:
            raise ValueError("the cpu backend's kernels did not build (is a C compiler installed?)")
    if name == "cuda" and not _triton_available():
        raise ValueError("the cuda backend needs Triton: pip install 'moe-mesh[gpu]'")
    return name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str, device: str | torch.device, rms_norm_eps: float, **options) -> TorchBackend:
    """The backend `name` (after `resolve_backend`) for a model with this norm epsilon. options:
    `threads` (cpu), `moe_kernel` (cuda)."""
    name = resolve_backend(name, device)
    if name == "cpu":
        from mesh.model.cpu.backend import CpuBackend
        return CpuBackend(rms_norm_eps, threads=options.get("threads", 0))
    if name == "cuda":
        from mesh.model.cuda.backend import CudaBackend
        return CudaBackend(rms_norm_eps, moe_kernel=options.get("moe_kernel", "auto"))
    return TorchBackend(rms_norm_eps)
