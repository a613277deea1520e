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
    # Expert worker processes behind it (0: every expert in this process), and the CPU threads each
    # computes with (0 where there are none).
    num_workers: int
    worker_threads: int
    # Counters since start, never reset (the engine's stats and the step records read them):
    # host seconds spent reaching the experts (in-process: computing them), wall and this thread's CPU;
    expert_seconds: float
    expert_cpu_seconds: float
    # each worker's compute seconds as of the last step header ([] without workers);
    worker_compute_seconds: list[float]
    # transport seconds per MoE layer since the last `reset_counters` ([] without a transport), and the
    # bytes moved to and from the workers.
    layer_seconds: list[float]
    total_bytes_sent: int
    total_bytes_received: int

    @property
    def expert_load(self) -> torch.Tensor:
        """[MoE layers, experts] int64 on the host: rows routed to each logical expert since the last
        `reset_counters` (what balancing and metrics read)."""

    def reset_counters(self) -> None:
        """Zero the load counters."""

    def set_step_trace(self, trace_id: int, span_id: int) -> None:
        """The engine's span of the next step ((0, 0): not sampled), which a dispatcher with workers
        sends them so that their spans join the step's trace; in-process, nothing to do."""

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


class ExpertsLost(RuntimeError):
    """A step could not reach its experts: a member of the expert pool was lost (its process died, or
    the collective between them failed) while the step ran. The step's work is void (no token of it
    may be kept); the dispatcher waits for its pool to re-form at the next `begin_step`."""


class ExpertsUnavailable(RuntimeError):
    """The dispatcher cannot reach experts any more and will not recover: every expert worker is gone,
    or the pool could not be re-formed. Nothing can be served."""
