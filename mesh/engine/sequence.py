"""A request's mutable state inside the engine: one Sequence per completion (a request with n > 1
has n, told apart by `index`)."""

from __future__ import annotations

import enum
import hashlib

import torch

from mesh.types import FinishReason, Request


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, arrival: int, index: int = 0):
        self.request = request
        self.request_id = request.request_id
        self.index = index
        self.sampling = request.sampling
        # prompt + generated (a resumed request's earlier output first: it counts as generated)
        self.token_ids: list[int] = list(request.prompt_token_ids) + list(request.resume_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_resumed = len(request.resume_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V sit in this sequence's blocks
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks computed so far
        self.num_cached_tokens = 0  # prefix-cache hit at first admission (reported in usage)
        self.cached_local = 0  # ... of which from this process's block pool
        self.cached_remote = 0  # ... of which from a remote tier (Redis)
        self.admitted = False
        self.arrival = arrival  # admission order: later arrivals are preempted first
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        # hybrid models (mesh.engine.state_cache): the sequence's slot in the recurrent-state pool, how
        # to initialise it before its next chunk (None: nothing to do; -1: zeros; else the snapshot
        # slot to copy), and snapshots requested for its blocks but not yet published (index -> slot)
        self.state_slot = -1
        self.state_init: int | None = None
        self.pending_snapshots: dict[int, int] = {}
        self.fork_parent: Sequence | None = None  # set while it waits to share that completion's prompt
        self.generator: torch.Generator | None = None
        # tracing state (mesh.engine.observe): open spans and the first token's time
        self.trace_parent = None
        self.queue_span = None
        self.chunk_span = None
        self.decode_span = None
        self.first_token_time: float | None = None
        if request.sampling.seed is not None:
            # A private generator per request: its draws do not depend on what else is batched.
            # Completion 0 draws from the seed itself; the others from seeds derived from (seed, index).
            seed = request.sampling.seed
            if index:
                seed = int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")
            self.generator = torch.Generator().manual_seed(seed % (2**63))
            self.skip_draws = self.num_resumed  # the sampler's per-token draws the resumed tokens took
        else:
            self.skip_draws = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_new_tokens(self) -> int:
        """Output tokens generated here (a resumed request's earlier ones excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens - self.num_resumed

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
