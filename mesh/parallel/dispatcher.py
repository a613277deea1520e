"""The communication strategy between the router and the experts: two verbs, `dispatch` and `combine`.

One file per backend: `local.py` (in-process, the single-process engine and the mesh's oracle) and,
with the mesh, the `torch.distributed` collective one. The MoE layer calls exactly this interface, so
the model never knows which backend moved its rows.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Dispatcher(Protocol):
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
