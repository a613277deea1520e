"""Continuous batching with chunked prefill under a per-step token budget.

Each step, every running sequence asks for its uncomputed tokens (1 when decoding, a chunk when
prefilling), oldest first; then waiting sequences are admitted while budget, sequence slots and KV
blocks last. When the pool runs dry, the most recently admitted running sequence is preempted by
recompute: its blocks are released and it goes back to the front of the queue with every token it
has (prompt and output), so nothing is lost; its full blocks usually survive in the prefix cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from mesh.engine.block_manager import BlockManager
from mesh.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits give the next one."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_fetch: Callable[[Sequence], int] | None = None):
        self.blocks = blocks
        # After the local prefix match, a further tier may extend it (the Redis-backed cache).
        self.prefix_fetch = prefix_fetch
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._admissions = 0
        self.num_preemptions = 0  # since start

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue `seq`; `front`: ahead of every waiting sequence (a completion forked from a running one)."""
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Finish or abort: release its blocks and forget it."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.allocate(seq, n):
                # victims come from the tail, which is never before i: nothing scheduled is undone
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted; everything after it already was too

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                # first admission, or re-admission after preemption: reuse what is cached
                local = self.blocks.match_prefix(seq)
                remote = self.prefix_fetch(seq) if self.prefix_fetch is not None else 0
                if not seq.admitted:
                    seq.num_cached_tokens = local + remote
                    seq.cached_local, seq.cached_remote = local, remote
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.allocate(seq, n):
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            if self.blocks.states is not None:
                self.blocks.states.acquire(seq)  # hybrid: its recurrent-state slot
            seq.admitted = True
            seq.status = Status.RUNNING
            self._admissions += 1
            seq.arrival = self._admissions
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def requeue(self, seqs: list[Sequence]) -> None:
        """Undo a step that failed before its results were kept: each running sequence in `seqs` is
        preempted by recompute (blocks released, back to the queue front in its order, every token
        kept), as the pool running dry would."""
        out = SchedulerOutput()
        for seq in reversed(seqs):  # appendleft: the first of them ends up first
            if seq.status is Status.RUNNING:
                self._preempt(seq, out)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
