"""The in-process dispatcher: every expert lives in this process, slot == logical expert id.

`dispatch` runs the experts port of the shard's backend at once (hidden states, top-k ids and weights
in, the combined output back: on a GPU one fused kernel chain with no host synchronisation), and
`combine` hands the result over.
"""

from __future__ import annotations

import time

import torch

from mesh.model.moe import ExpertShard


class LocalDispatcher:
    # Nothing in a step waits on the host: a decode step through this dispatcher can be captured in a
    # CUDA graph (the collective dispatcher's per-layer host counts cannot).
    graph_capturable = True
    num_workers = worker_threads = 0  # every expert in this process
    total_bytes_sent = total_bytes_received = 0  # no transport

    def __init__(self, experts: ExpertShard, num_experts: int):
        if experts.num_slots != num_experts:
            raise ValueError(f"local dispatch needs all {num_experts} experts, shard holds {experts.num_slots}")
        self.experts = experts
        self.num_experts = num_experts
        # tokens routed to each expert of each MoE layer since the last reset (the load that
        # balancing and metrics read), kept where the experts run: reading it on a GPU is a copy
        self._load = torch.zeros(len(experts.layers), num_experts, dtype=torch.int64, device=experts.device)
        # host seconds inside dispatch since start: the experts' compute on the CPU (on a GPU only the
        # launches), which capacity planning splits from the rest of a step
        self.expert_seconds = self.expert_cpu_seconds = 0.0  # wall, and this thread's CPU
        self.worker_compute_seconds: list[float] = []
        self.layer_seconds: list[float] = []

    @property
    def expert_load(self) -> torch.Tensor:
        """[L, E] int64 on the host: rows routed to each expert since the last reset."""
        return self._load.cpu()

    def reset_counters(self) -> None:
        self._load.zero_()

    def set_step_trace(self, trace_id: int, span_id: int) -> None:
        pass  # no workers to tell

    def begin_step(self, num_tokens: int, micro_batches: int = 1) -> None:
        pass

    def end_step(self) -> None:
        pass

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.experts.local(moe_index, hidden, topk_ids, topk_weights, self._load[moe_index])
        self.expert_seconds += time.perf_counter() - t0
        self.expert_cpu_seconds += time.thread_time() - c0
        return out

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle
