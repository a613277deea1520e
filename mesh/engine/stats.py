"""What the engine reports about itself: one typed snapshot (`Engine.stats()`), read by the gateway's
GetServerStats and GetModelInfo, the metrics, and the pool's admin surface. The edge asks the engine
for this instead of reaching into its scheduler or dispatcher.

Add a field here (with a default, so that older readers keep working) rather than a new attribute
that the edge probes for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PoolStats:
    """The experts' side: in this process (num_workers 0) or a pool of expert workers."""
    num_workers: int = 0  # expert worker processes (0: every expert runs in the engine's process)
    worker_threads: int = 0  # CPU threads each worker computes with (0: no workers)
    # Host seconds the engine spent reaching its experts (in-process: computing them) since start,
    # wall and the engine thread's CPU.
    expert_seconds: float = 0.0
    expert_cpu_seconds: float = 0.0
    # Each worker's compute seconds since start, as of the last step header ([] without workers).
    worker_compute_seconds: tuple[float, ...] = ()
    # [MoE layers, experts] int64 on the host: rows routed to each expert since the last counter reset
    # (None when not asked for: reading it copies from the device).
    expert_load: torch.Tensor | None = None

    @property
    def moe_layers(self) -> int:
        return 0 if self.expert_load is None else self.expert_load.shape[0]

    @property
    def num_experts(self) -> int:
        return 0 if self.expert_load is None else self.expert_load.shape[1]


@dataclass(frozen=True)
class EngineStats:
    steps: int = 0  # engine steps since start
    running: int = 0  # sequences in the running batch
    waiting: int = 0  # sequences waiting for admission (or preempted)
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    preemptions: int = 0  # sequences preempted for KV space since start
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    pool: PoolStats = field(default_factory=PoolStats)
