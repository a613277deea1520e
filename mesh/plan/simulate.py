"""Discrete-event simulation of the serving engine: arrivals, queueing, continuous batching.

It replays what mesh.engine.scheduler does, step by step: every running sequence asks for its
uncomputed tokens (1 when decoding, a chunk when prefilling), oldest first, under the per-step token
budget; then waiting sequences are admitted while budget, sequence slots and KV blocks last; when
the KV pool runs dry the most recently admitted sequence is preempted by recompute. A request that
arrives during a step joins at the next one (the engine thread drains its inbox between steps). The
step's duration comes from a `StepCost`: a function of what each gateway computes in that step.

A gateways step in lockstep (they share the expert pool: one collective per MoE layer), so the step
time is the cost of all their batches together; a new request goes to the gateway holding the
fewest requests. Independent replicas (no shared expert pool) are separate simulations over a
round-robin split of the arrivals: `simulate_replicas`.

Output: one record per request in the format of mesh.plan.metrics (times in seconds), so the
simulator's predictions and the load test's measurements go through the same arithmetic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Limits:
    """The engine's scheduler limits (EngineConfig) and KV pool size in blocks (None: unlimited)."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_blocks: int | None = None
    block_size: int = 16


@dataclass
class Batch:
    """What one gateway computes in one step."""
    seqs: int = 0
    decode: int = 0  # tokens of sequences past their prompt (1 each)
    prefill: int = 0  # prompt tokens
    ctx: float = 0.0  # attention work: sum over computed tokens of the context each attends to
    decode_ctx: float = 0.0  # context read by the decode tokens (KV bytes streamed from memory)

    @property
    def tokens(self) -> int:
        return self.decode + self.prefill


StepCost = Callable[[Sequence[Batch]], float]  # seconds for one lockstep step over all gateways


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # seconds
    prompt: int
    output: int
    cached: int = 0  # prompt tokens found in the prefix cache


class _Seq:
    __slots__ = ("i", "req", "computed", "total", "generated", "blocks", "first", "last", "itl", "admitted")

    def __init__(self, i: int, req: SimRequest):
        self.i, self.req = i, req
        self.computed, self.total, self.generated, self.blocks = 0, req.prompt, 0, 0
        self.first = self.last = None
        self.itl: list[float] | None = None
        self.admitted = False


class _Gateway:
    def __init__(self, limits: Limits):
        self.lim = limits
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.free = limits.kv_blocks if limits.kv_blocks is not None else 1 << 62
        self.preemptions = 0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.lim.block_size)

    def _preempt(self, s: _Seq) -> None:
        self.running.remove(s)
        self.free += s.blocks
        s.blocks, s.computed = 0, 0
        self.waiting.appendleft(s)
        self.preemptions += 1

    def schedule(self) -> tuple[Batch, list[tuple[_Seq, int]]]:
        lim, b, out = self.lim, Batch(), []
        budget = lim.max_num_batched_tokens
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            n = min(s.total - s.computed, budget)
            need = self._blocks(s.computed + n) - s.blocks
            preempted_self = False
            while need > self.free:
                victim = running[-1]
                self._preempt(victim)
                if victim is s:
                    preempted_self = True
                    break
            if preempted_self:
                break
            self.free -= need
            s.blocks += need
            out.append((s, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(running) < lim.max_num_seqs:
            s = self.waiting[0]
            if s.computed == 0:
                s.computed = min(s.req.cached, s.req.prompt - 1)
            n = min(s.total - s.computed, budget)
            need = self._blocks(s.computed + n)
            if need > self.free:
                s.computed = 0
                break
            self.waiting.popleft()
            self.free -= need
            s.blocks = need
            s.admitted = True
            running.append(s)
            out.append((s, n))
            budget -= n
        for s, n in out:
            c = s.computed
            b.seqs += 1
            if c >= s.req.prompt:
                b.decode += n
                b.decode_ctx += c + n
            else:
                b.prefill += n
            b.ctx += n * c + n * (n + 1) / 2
        return b, out

    def finish_step(self, scheduled: list[tuple[_Seq, int]], t: float, record_itl: bool) -> list[_Seq]:
        done = []
        for s, n in scheduled:
            s.computed += n
            if s.computed < s.total:
                continue  # a prefill chunk short of the end: no token yet
            s.generated += 1
            s.total += 1
            if s.first is None:
                s.first = t
                if record_itl:
                    s.itl = []
            elif record_itl:
                s.itl.append((t - s.last) * 1000.0)
            s.last = t
            if s.generated >= s.req.output:
                self.running.remove(s)
                self.free += s.blocks
                s.blocks = 0
                done.append(s)
        return done


def simulate(requests: Sequence[SimRequest], cost: StepCost, limits: Limits = Limits(), *,
             gateways: int = 1, concurrency: int | None = None, horizon: float | None = None,
             latency_s: float = 0.0, record_itl: bool = False, max_time: float | None = None,
             max_queue: int | None = None) -> list[dict]:
    """Simulate `requests` (sorted by arrival) on `gateways` lockstep gateways.

    concurrency: closed loop instead: `concurrency` requests in flight from t=0, each completion sends
    the next one of `requests` (their arrival times ignored) until `horizon` seconds.
    latency_s: fixed client<->server latency added to every response time (the RPC, queueing in
    the server's event loop: calibrated from measurements).
    max_time, max_queue: stop once the clock passes max_time or more than max_queue requests wait
    (an overloaded deployment: no need to simulate the queue growing); requests not done then get
    code "UNFINISHED".
    """
    if gateways < 1:
        raise ValueError(f"gateways must be >= 1, got {gateways}")
    gws = [_Gateway(limits) for _ in range(gateways)]
    seqs: list[_Seq] = []
    pending: deque[tuple[float, SimRequest]]
    if concurrency is None:
        pending = deque((r.arrival, r) for r in requests)
    else:
        pending = deque((0.0, r) for r in requests[:concurrency])
    source = iter(requests[concurrency:]) if concurrency is not None else None
    sent: dict[int, float] = {}
    t = 0.0
    in_system = 0
    while pending or in_system:
        if max_time is not None and t > max_time:
            break
        if max_queue is not None and sum(len(g.waiting) for g in gws) > max_queue:
            break
        # admit everything that has arrived by now (it reached the engine's inbox before this step)
        if not in_system and pending and pending[0][0] > t:
            t = pending[0][0]
        while pending and pending[0][0] <= t:
            at, req = pending.popleft()
            s = _Seq(len(seqs), req)
            seqs.append(s)
            sent[s.i] = at
            min(gws, key=lambda g: g.load).waiting.append(s)
            in_system += 1
        plans = [g.schedule() for g in gws]
        batches = [p[0] for p in plans]
        if not any(b.seqs for b in batches):
            # nothing schedulable (cannot happen with a sane pool): jump to the next arrival
            if not pending:
                break
            t = max(t, pending[0][0])
            continue
        t += cost(batches)
        for g, (_b, sched) in zip(gws, plans):
            for s in g.finish_step(sched, t, record_itl):
                in_system -= 1
                if source is not None and (horizon is None or t < horizon):
                    nxt = next(source, None)
                    if nxt is not None:
                        pending.append((t, nxt))
    records = []
    for s in seqs:
        done = s.generated >= s.req.output
        rec = {"sent_s": sent[s.i], "prompt_tokens": s.req.prompt, "cached_tokens": min(s.req.cached, s.req.prompt - 1)
               if s.admitted else 0, "output_tokens": s.generated,
               "first_token_s": None if s.first is None else s.first + latency_s,
               "end_s": (s.last if s.last is not None else t) + latency_s,
               "code": "OK" if done else "UNFINISHED"}
        if record_itl:
            rec["itl_ms"] = s.itl or []
        records.append(rec)
    return records


def simulate_replicas(requests: Sequence[SimRequest], cost: StepCost, limits: Limits = Limits(), *,
                      replicas: int = 1, **kw) -> list[dict]:
    """`replicas` independent engines behind a round-robin balancer (data parallelism without a
    shared expert pool)."""
    out: list[dict] = []
    for k in range(replicas):
        out += simulate(requests[k::replicas], cost, limits, **kw)
    return out
