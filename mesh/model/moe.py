"""Mixture-of-Experts pieces: the router, the stacked expert weights, and their grouped compute.

The router runs where attention runs (the gateway). Expert compute runs wherever the dispatcher put
the rows: in-process for the local dispatcher, on an expert worker for the collective one. It sees
only rows already sorted by local expert slot and their counts, never which backend moved them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mesh.model.layers import silu_mul


def route(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalize: bool,
          weights_in_model_dtype: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H] -> (topk_ids [T, K] int64, topk_weights [T, K]).

    Softmax over all experts in float32, top-k, renormalised when `normalize`. Qwen casts the weights
    back to the model dtype, Mixtral keeps them in float32: both as transformers does.
    """
    logits = F.linear(hidden, router_weight)  # [T, E]
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

    gate_up: torch.Tensor  # [S, 2I, H]
    down: torch.Tensor  # [S, H, I]


class ExpertShard:
    """The experts one process holds, for every MoE layer, indexed by local slot.

    `layers[moe_index]` holds the stacked weights; slot s of a layer is the physical expert that the
    placement maps to this rank's s-th slot.
    """

    def __init__(self, layers: list[ExpertWeights]):
        self.layers = layers

    @property
    def num_slots(self) -> int:
        return self.layers[0].gate_up.shape[0] if self.layers else 0

    def forward(self, moe_index: int, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, H] sorted by local slot, counts[s] rows per slot -> outputs [N, H] (unweighted).

        A grouped matmul: one GEMM pair per slot that has rows, never a loop over tokens.
        """
        w = self.layers[moe_index]
        out = torch.empty_like(rows)
        start = 0
        for slot, n in enumerate(counts):
            if n == 0:
                continue
            x = rows[start:start + n]
            out[start:start + n] = F.linear(silu_mul(F.linear(x, w.gate_up[slot])), w.down[slot])
            start += n
        return out


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (order [T*K]: flat (token, k) indices sorted by expert, counts [E])."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def weighted_scatter(out_rows: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor,
                     num_tokens: int, top_k: int) -> torch.Tensor:
    """Combine: sum over k of weight[t, k] * expert_out[t, k], accumulated in float32 -> [T, H] float32."""
    w = topk_weights.reshape(-1)[order].to(torch.float32)  # [T*K]
    token = torch.div(order, top_k, rounding_mode="floor")
    acc = torch.zeros(num_tokens, out_rows.shape[-1], dtype=torch.float32, device=out_rows.device)
    acc.index_add_(0, token, out_rows.float() * w[:, None])
    return acc
