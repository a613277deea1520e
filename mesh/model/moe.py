"""Mixture-of-Experts pieces: the router, the stacked expert weights, and their grouped compute.

The router runs where attention runs (the gateway). Expert compute runs wherever the dispatcher put
the rows: in-process for the local dispatcher, on an expert worker for the collective one. It sees
only rows already sorted by local expert slot and their counts, never which backend moved them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mesh.model import native
from mesh.model.layers import silu_mul


def route(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalize: bool,
          weights_in_model_dtype: bool, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H] -> (topk_ids [T, K] int64, topk_weights [T, K]).

    Softmax over all experts in float32, top-k, renormalised when `normalize`. Qwen casts the weights
    back to the model dtype, Mixtral keeps them in float32: both as transformers does. `logits`, when
    given, are the router's output [T, E] computed by the caller (the CPU's native linear).
    """
    if logits is None:
        logits = F.linear(hidden, router_weight)  # [T, E]
    if native.enabled():
        # The CPU: top-k over the logits (softmax is monotonic: the same experts, equal values in
        # torch.topk's order), then the weights in one native pass instead of four more ops; both in
        # one call where the C++ top-k is built.
        out_dtype = hidden.dtype if weights_in_model_dtype else torch.float32
        routed = native.route(logits, top_k, normalize, out_dtype)
        if routed is not None:
            return routed
        ids = torch.topk(logits, top_k, dim=-1).indices
        weights = native.route_weights(logits, ids, normalize, hidden.dtype if weights_in_model_dtype
                                       else torch.float32)
        if weights is not None:
            return ids, weights
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_in_model_dtype:
        weights = weights.to(hidden.dtype)
    return ids, weights


@dataclass
class ExpertWeights:
    """One MoE layer's experts held by this process, stacked by local slot."""

    gate_up: torch.Tensor | None  # [S, 2I, H]; None once released in favour of the packed copies
    down: torch.Tensor | None  # [S, H, I]
    # The native kernel's packed copies (native.pack_experts), made on first use where it runs;
    # False where it does not.
    packed: tuple[torch.Tensor, torch.Tensor] | None | bool = None

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down); rebuilt from the packed copies when released (the torch paths only run
        then if the native kernels were switched off after packing)."""
        if self.gate_up is None:
            return native.unpack_experts(*self.packed)
        return self.gate_up, self.down

    def native_packed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed copies, made now if the native kernel runs these weights here; else None."""
        if self.packed is None:
            self.packed = native.enabled() and native.experts_supported(self.gate_up, self.down) \
                and native.pack_experts(self.gate_up, self.down)
        return self.packed or None


class ExpertShard:
    """The experts one process holds, for every MoE layer, indexed by local slot.

    `layers[moe_index]` holds the stacked weights; slot s of a layer is the physical expert that the
    placement maps to this rank's s-th slot.
    """

    def __init__(self, layers: list[ExpertWeights]):
        self.layers = layers
        first = layers[0].gate_up if layers else torch.empty(0, 0, 0)
        self.num_slots, self.hidden_size = first.shape[0], first.shape[2]
        self.intermediate_size = first.shape[1] // 2
        self.dtype = first.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held (stacked and packed copies)."""
        held = [t for w in self.layers for t in (w.gate_up, w.down, *(w.packed or ())) if t is not None]
        return sum(t.nbytes for t in held)

    def pack_native(self, release: bool = True) -> bool:
        """Pack every layer for the native kernel now, where it runs these weights; with `release`,
        drop the stacked copies so each weight is held once. Returns whether the kernel runs them."""
        ok = bool(self.layers)
        for w in self.layers:
            if w.native_packed() is None:
                ok = False
            elif release:
                w.gate_up = w.down = None
        return ok

    def forward(self, moe_index: int, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, H] sorted by local slot, counts[s] rows per slot -> outputs [N, H] (unweighted).

        A grouped matmul, never a loop over tokens. When every slot gets a few rows (decode), one
        padded batched matmul over all slots beats a GEMM pair per slot, whose fixed per-call cost
        dominates at a few rows (measured ~1.5-2x at 2-16 rows per slot). When padding would waste
        more than that saves (a few rows spread thinly, or large prefill batches), loop over slots.
        """
        w = self.layers[moe_index]
        n, s, width = rows.shape[0], len(counts), max(counts, default=0)
        packed = w.native_packed() if n else None
        if packed is not None:
            out = native.moe_experts(rows, counts, packed, self.intermediate_size)
            if out is not None:
                return out
        gate_up, down = w.stacked()
        if n and s * width <= min(2 * n, n + PAD_ROWS_PER_SLOT * s):
            return _padded_experts(rows, counts, width, gate_up, down)
        out = torch.empty_like(rows)
        start = 0
        for slot, c in enumerate(counts):
            if c == 0:
                continue
            x = rows[start:start + c]
            out[start:start + c] = F.linear(silu_mul(F.linear(x, gate_up[slot])), down[slot])
            start += c
        return out


# The padded path may at most double the rows and add this many padding rows per slot on average:
# about what one small GEMM call costs beyond its rows. Past that (large prefill batches, where each
# slot's GEMM is big enough to run efficiently alone) the per-slot loop wins.
PAD_ROWS_PER_SLOT = 16


def _padded_experts(rows: torch.Tensor, counts: list[int], width: int, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """rows [N, H] sorted by slot -> [N, H], through [S, width, H] padded slots and two `bmm`s."""
    s, h = len(counts), rows.shape[1]
    c = torch.tensor(counts, device=rows.device)  # [S]
    # row r of slot e (sorted position start[e] + r) goes to padded position e * width + r
    shift = torch.arange(s, device=rows.device) * width - (torch.cumsum(c, 0) - c)  # [S]
    dest = torch.arange(rows.shape[0], device=rows.device) + torch.repeat_interleave(shift, c)  # [N]
    x = rows.new_zeros(s * width, h).index_copy_(0, dest, rows).view(s, width, h)
    gu = torch.bmm(x, gate_up.transpose(1, 2))  # [S, width, 2I]
    y = torch.bmm(silu_mul(gu), down.transpose(1, 2))  # [S, width, H]
    return y.view(s * width, h).index_select(0, dest)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (order [T*K]: flat (token, k) indices sorted by expert, counts [E])."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def weighted_scatter(out_rows: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor,
                     num_tokens: int, top_k: int) -> torch.Tensor:
    """Combine: sum over k of weight[t, k] * expert_out[t, k] -> [T, H], accumulated in float32.

    Un-sorts the rows with a gather (row order[i] of the (token, k) grid sits at sorted position i),
    then one [1, K] x [K, H] matmul per token: the kernel multiplies and accumulates in float32 and
    rounds once, which equals the float32 sum rounded to the rows' dtype, without an `index_add_`
    scatter or float32 copies of every row. Returned in the rows' dtype, or float32 when the
    weights are float32 and the rows are not (Mixtral keeps its router weights in float32).
    """
    n, h = out_rows.shape
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(n, device=order.device))  # [T*K]
    per_token = out_rows.index_select(0, inverse).view(num_tokens, top_k, h)  # [T, K, H]
    w = topk_weights.reshape(num_tokens, 1, top_k)  # [T, 1, K]
    if w.dtype != per_token.dtype:
        per_token, w = per_token.float(), w.float()
    return torch.bmm(w, per_token).view(num_tokens, h)
