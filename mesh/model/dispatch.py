"""The protocol the MoE layer calls to reach its experts: two verbs, `dispatch` and `combine`.

It lives beside the model (the model calls it); the implementations live in `mesh.parallel`, one file
per transport: `local.py` (every expert in-process: the single-process engine and the mesh's oracle)
and `collective.py` (`torch.distributed` all-to-all to expert ranks). The model never knows which one
moved its rows.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Dispatcher(Protocol):
    # Whether a step through it can be captured in a CUDA graph: no host round trip per layer (the
    # local one; the collective one reads each layer's row counts on the host).
    graph_capturable: bool

    @property
    def expert_load(self) -> torch.Tensor:
        """[MoE layers, experts] int64 on the host: rows routed to each logical expert since the last
        `reset_counters` (what balancing and metrics read)."""

    def reset_counters(self) -> None:
        """Zero the load counters."""

    def begin_step(self, num_tokens: int, micro_batches: int = 1) -> None:
        """Called once per model forward, before the first layer (the collective backend announces
        the step to the expert ranks here). With `micro_batches` M, every MoE layer then sees M
        dispatch/combine pairs, micro-batch 0 first."""

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> Any:
        """Send hidden [T, H] rows to experts topk_ids [T, K]; returns a handle for `combine`."""

    def combine(self, handle: Any) -> torch.Tensor:
        """Bring the expert outputs back: sum_k weight[t, k] * expert_k(hidden[t]) -> [T, H]."""

    def end_step(self) -> None:
        """Called once per model forward, after the last layer."""
