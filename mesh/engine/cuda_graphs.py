"""Decode steps replayed from CUDA graphs.

A decode step of a 48-layer MoE model is about 700 small kernels; launched one by one from Python the
GPU waits on the host most of the step. Captured once per batch size in a CUDA graph, a step is one
replay. Graphs are captured at start for batch sizes 1, 2, 4, 8 and every multiple of 8 up to
`max_num_seqs`; a batch is padded up to the next captured size. Everything a graph reads lives in
static buffers that each step overwrites before the replay:

    input_ids [Bmax], positions [Bmax], slot_mapping [Bmax] int64, block_table [Bmax, max_blocks] int32,
    context_lens [Bmax] int32  ->  logits [Bmax, V] float32

Padding rows have slot -1 (no KV write, no expert work: the router marks them) and context length
0 (attention gives zeros). Prefill and mixed steps run eagerly: their shapes vary every step.
"""

from __future__ import annotations

import logging
import time

import torch

from mesh.model.attention import AttentionMetadata, KVCache
from mesh.model.decoder import MoEDecoder

log = logging.getLogger("mesh.engine")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8 and every multiple of 8, up to the first that holds max_num_seqs."""
    sizes = []
    for s in [1, 2, 4] + list(range(8, max(8, max_num_seqs) + 8, 8)):
        sizes.append(s)
        if s >= max_num_seqs:
            break
    return sizes


class DecodeGraphs:
    def __init__(self, model: MoEDecoder, kv: KVCache, dispatcher, max_num_seqs: int, max_model_len: int):
        self.model, self.kv, self.dispatcher = model, kv, dispatcher
        self.device = model.device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        b, dev = self.sizes[-1], self.device
        self.max_blocks = -(-max_model_len // kv.block_size)
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.slots = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self.table = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(b, dtype=torch.int32, device=dev)
        # hybrid models: each row's recurrent-state slot; padding rows use the pool's last slot, which
        # no sequence owns (a scratch slot)
        self.states = kv.states
        self.state_slots = None
        if self.states is not None:
            self.scratch_slot = self.states.num_slots - 1
            self.state_slots = torch.full((b,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.logits = torch.empty(b, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        # host staging (pinned: the copies to the device do not wait for the host)
        pin = torch.cuda.is_available()
        self._host_rows = torch.zeros(5, b, dtype=torch.int64, pin_memory=pin)  # ids, positions, slots, lens, states
        self._host_table = torch.zeros(b, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        # the last step: host seconds from the call to the replay's launch (benchmarks read these)
        self.last_host_seconds = 0.0

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], num_decode=b, decode_block_table=self.table[:b],
                                 decode_context_lens=self.lens[:b], max_decode_context=self.max_model_len,
                                 decode_state_slots=None if self.state_slots is None else self.state_slots[:b])

    def _forward(self, b: int) -> None:
        hidden = self.model.forward(self.input_ids[:b], self.positions[:b], self._meta(b), self.kv, self.dispatcher)
        self.logits[:b].copy_(self.model.logits(hidden))

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        """Warm up (compiles the kernels for each shape) and capture every size, largest first so the
        shared memory pool is sized by the largest."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            self._forward(b)  # eager: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(b)
            self.graphs[b] = graph
            if progress is not None:
                progress(f"captured the decode graph for batch {b} ({len(self.graphs)}/{len(self.sizes)})")
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch %d..%d) in %.1fs", len(self.graphs), self.sizes[0],
                 self.sizes[-1], self.capture_seconds)

    def size_for(self, n: int) -> int | None:
        """The captured batch size that serves n decode rows, or None (more than the largest)."""
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(self, ids: list[int], positions: list[int], slots: list[int], lens: list[int],
            tables: list[list[int]], state_slots: list[int] | None = None) -> torch.Tensor:
        """One decode step for n = len(ids) sequences -> logits [n, V] float32 (a view of the static
        output: valid until the next step)."""
        t0 = time.perf_counter()
        n = len(ids)
        b = self.size_for(n)
        width = max(len(t) for t in tables)
        rows = self._host_rows
        fields = [ids, positions, slots, lens] + ([state_slots] if self.state_slots is not None else [])
        rows[:len(fields), :n] = torch.tensor(fields)  # one conversion for every per-row field
        rows[:, n:b] = 0
        rows[2, n:b] = -1  # padding: no KV slot
        if self.state_slots is not None:
            rows[4, n:b] = self.scratch_slot
            self.state_slots[:b].copy_(rows[4, :b], non_blocking=True)
        self._host_table[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        host_table = self._host_table
        self.input_ids[:b].copy_(rows[0, :b], non_blocking=True)
        self.positions[:b].copy_(rows[1, :b], non_blocking=True)
        self.slots[:b].copy_(rows[2, :b], non_blocking=True)
        self.lens[:b].copy_(rows[3, :b], non_blocking=True)
        self.table[:n, :width].copy_(host_table[:n, :width], non_blocking=True)
        self.graphs[b].replay()
        self.last_host_seconds = time.perf_counter() - t0
        return self.logits[:n]
