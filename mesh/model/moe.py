"""Mixture-of-Experts pieces: the router, the stacked expert weights, and their grouped compute in
torch ops (the reference backend's; the CPU and CUDA backends bring their own kernels).

The router runs where attention runs (the gateway). Expert compute runs wherever the dispatcher put
the rows: in-process for the local dispatcher (`ExpertShard.local`: hidden states, top-k ids and
weights in, the combined output back), on an expert worker for the collective one
(`ExpertShard.forward`: rows already grouped by local slot, never knowing which transport moved them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mesh.model.layers import silu_mul


def route(logits: torch.Tensor, top_k: int, normalize: bool, weights_dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] in weights_dtype).

    Softmax over all experts in float32, top-k, renormalised when `normalize`. Qwen casts the weights
    back to the model dtype, Mixtral keeps them in float32: both as transformers does.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(weights_dtype)


@dataclass
class ExpertWeights:
    """One MoE layer's experts held by this process, stacked by local slot."""

    gate_up: torch.Tensor | None  # [S, 2I, H] (gate rows, then up rows); None once a backend released it
    down: torch.Tensor | None  # [S, H, I]
    prepared: Any = None  # what the backend made of them at load (the CPU backend's packed copies)


class ExpertShard:
    """The experts one process holds, for every MoE layer, indexed by local slot, and the backend that
    computes them.

    `layers[moe_index]` holds the stacked weights; slot s of a layer is the physical expert that the
    placement maps to this rank's s-th slot. `backend.prepare_experts(shard)` binds a backend (and may
    repack the weights); until then the torch reference computes them.
    """

    def __init__(self, layers: list[ExpertWeights]):
        self.layers = layers
        first = layers[0].gate_up if layers else torch.empty(0, 0, 0)
        self.num_slots, self.hidden_size = first.shape[0], first.shape[2]
        self.intermediate_size = first.shape[1] // 2
        self.dtype = first.dtype
        self.device = first.device
        self.backend = None

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held (stacked and prepared copies)."""
        held = []
        for w in self.layers:
            held += [w.gate_up, w.down]
            if isinstance(w.prepared, (tuple, list)):
                held += list(w.prepared)
        return sum(t.nbytes for t in held if isinstance(t, torch.Tensor))

    def _ops(self):
        if self.backend is None:
            from mesh.model.backend import TorchBackend
            self.backend = TorchBackend()
        return self.backend

    def forward(self, moe_index: int, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, H] sorted by local slot, counts[s] rows per slot -> outputs [N, H] (unweighted)."""
        return self._ops().grouped_experts(self.layers[moe_index], rows, counts)

    def local(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              load: torch.Tensor | None = None) -> torch.Tensor:
        """All experts held here (slot == expert id): hidden [T, H], topk ids/weights [T, K] ->
        sum_k weight * expert(hidden) [T, H]; `load` [E] int64 gets the rows per expert added."""
        return self._ops().experts(self.layers[moe_index], hidden, topk_ids, topk_weights, load)


# ---- the torch reference's expert compute

def grouped_experts(gate_up: torch.Tensor, down: torch.Tensor, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """rows [N, H] sorted by slot, counts[s] rows per slot -> outputs [N, H] (unweighted).

    A grouped matmul, never a loop over tokens. When every slot gets a few rows (decode), one
    padded batched matmul over all slots beats a GEMM pair per slot, whose fixed per-call cost
    dominates at a few rows (measured ~1.5-2x at 2-16 rows per slot). When padding would waste
    more than that saves (a few rows spread thinly, or large prefill batches), loop over slots.
    """
    n, s, width = rows.shape[0], len(counts), max(counts, default=0)
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


def local_experts(gate_up: torch.Tensor, down: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert held here: sort the (token, k) pairs by expert, run `grouped_experts`, combine."""
    t, k = topk_ids.shape
    order, counts = sort_by_expert(topk_ids, gate_up.shape[0])
    counts = counts.cpu()  # the group sizes live on the host
    if load is not None:
        load += counts.to(load.device)
    rows = hidden.index_select(0, torch.div(order, k, rounding_mode="floor"))  # [T*K, H]
    out = grouped_experts(gate_up, down, rows, counts.tolist())
    return weighted_scatter(out, order, topk_weights, t, k).to(hidden.dtype)


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
