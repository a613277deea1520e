"""The in-process dispatcher: every expert lives in this process, slot == logical expert id."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mesh.model import native
from mesh.model.moe import ExpertShard, sort_by_expert, weighted_scatter


@dataclass
class _Done:
    out: torch.Tensor  # [T, H] the combined output, already computed (the native path)


@dataclass
class _Pending:
    rows_out: torch.Tensor  # [T*K, H] expert outputs, sorted by expert
    order: torch.Tensor  # [T*K]
    topk_weights: torch.Tensor  # [T, K]
    num_tokens: int
    dtype: torch.dtype


class LocalDispatcher:
    def __init__(self, experts: ExpertShard, num_experts: int):
        if experts.num_slots != num_experts:
            raise ValueError(f"local dispatch needs all {num_experts} experts, shard holds {experts.num_slots}")
        self.experts = experts
        self.num_experts = num_experts
        # tokens routed to each expert of each MoE layer since the last reset (the load that
        # balancing and metrics read)
        self.expert_load: torch.Tensor | None = None

    def begin_step(self, num_tokens: int, micro_batches: int = 1) -> None:
        pass

    def end_step(self) -> None:
        pass

    def native_moe_args(self, moe_index: int) -> tuple[int, int, int, int, int] | None:
        """For a caller that runs this layer's experts with `mesh_moe_local` itself (the decoder's lean
        CPU path): (packed gate_up address, packed down address, slots, intermediate size, address of
        this layer's int64 load counters, which the kernel adds to); None where the kernel does not run
        these experts (the caller uses the two verbs)."""
        if self.expert_load is None:
            self.expert_load = torch.zeros(len(self.experts.layers), self.num_experts, dtype=torch.int64)
        packed = self.experts.layers[moe_index].native_packed()
        if packed is None:
            return None
        gu, dn = packed
        return (gu.data_ptr(), dn.data_ptr(), gu.shape[0], self.experts.intermediate_size,
                self.expert_load[moe_index].data_ptr())

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> _Pending | _Done:
        t, k = topk_ids.shape
        if self.expert_load is None:
            self.expert_load = torch.zeros(len(self.experts.layers), self.num_experts, dtype=torch.int64)
        packed = self.experts.layers[moe_index].native_packed() if t else None
        if packed is not None:  # the CPU kernel: sort, experts and weighted combine in one call
            done = native.moe_local(hidden, topk_ids, topk_weights, packed, self.experts.intermediate_size,
                                    load=self.expert_load[moe_index])  # the kernel adds this layer's counts
            if done is not None:
                return _Done(done[0])
        order, counts = sort_by_expert(topk_ids, self.num_experts)
        counts = counts.cpu()  # the counters and the group sizes live on the host
        self.expert_load[moe_index] += counts
        rows = hidden.index_select(0, torch.div(order, k, rounding_mode="floor"))  # [T*K, H]
        out = self.experts.forward(moe_index, rows, counts.tolist())
        return _Pending(out, order, topk_weights, t, hidden.dtype)

    def combine(self, handle: _Pending | _Done) -> torch.Tensor:
        if isinstance(handle, _Done):
            return handle.out
        acc = weighted_scatter(handle.rows_out, handle.order, handle.topk_weights, handle.num_tokens,
                               handle.topk_weights.shape[1])
        return acc.to(handle.dtype)
