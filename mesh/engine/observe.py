"""What the engine tells tracing and metrics: per-request spans, one span per step, and instruments.

Request spans hang under the caller's context (the gRPC server span): queue wait, prefix-cache lookup
(tokens hit per tier), each prefill chunk, and the decode phase (token count); the finish is an event.
Each step is a span of its own, linked to the spans of the requests it served; its ids travel to the
expert ranks in the step header. With no SDK installed every call here is a no-op of the API.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation

from mesh import telemetry as t
from mesh.engine.sequence import Sequence
from mesh.model.dispatch import Dispatcher


# Bucket bounds in seconds (the SDK's defaults are meant for milliseconds).
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
_DISPATCH_BUCKETS = [5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1]


class _Instruments:
    """Created once per process: an instrument name registered twice would keep only the first
    callback, and a process may hold several engines (tests, benchmarks). Observable values sum
    over the live engines."""

    def __init__(self):
        m = t.meter()
        self.engines: weakref.WeakSet = weakref.WeakSet()
        self.ttft = m.create_histogram(t.M_TTFT, unit="s", description="time to first token",
                                       explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS)
        self.tpot = m.create_histogram(t.M_TPOT, unit="s", description="time per output token after the first",
                                       explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
        self.e2e = m.create_histogram(t.M_E2E, unit="s", description="request duration, arrival to finish",
                                      explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS)
        self.prefix_hits = m.create_counter(t.M_PREFIX_HITS, unit="{token}",
                                            description="prompt tokens served from a prefix-cache tier")
        self.dispatch_seconds = m.create_histogram(t.M_DISPATCH_SECONDS, unit="s",
                                                   description="dispatch + combine time of one MoE layer",
                                                   explicit_bucket_boundaries_advisory=_DISPATCH_BUCKETS)
        self.dispatch_bytes = m.create_counter(t.M_DISPATCH_BYTES, unit="By", description="bytes moved by dispatch")
        for name, read, desc in ((t.M_QUEUE_DEPTH, lambda e: e.num_waiting, "requests waiting"),
                                 (t.M_RUNNING, lambda e: e.num_running, "requests running"),
                                 (t.M_KV_USED, lambda e: e.blocks.num_used, "KV blocks in use"),
                                 (t.M_KV_FREE, lambda e: e.blocks.num_free, "KV blocks free")):
            m.create_observable_gauge(name, [self._summed(read)], description=desc)
        m.create_observable_counter(t.M_TOKENS, [self._tokens], unit="{token}",
                                    description="prompt tokens admitted (kind=prompt), of them served from a "
                                                "prefix cache (kind=cached), and output tokens sampled")
        m.create_observable_counter(t.M_EXPERT_TOKENS, [self._expert_tokens], unit="{token}",
                                    description="tokens routed to each expert of each MoE layer")
        m.create_observable_counter(t.M_TIER_BYTES, [self._tier_bytes], unit="By",
                                    description="bytes read from / written to a remote prefix-cache tier")
        m.create_observable_counter(t.M_TIER_CALLS, [self._tier_calls], unit="{call}",
                                    description="remote prefix-cache tier lookups, hits, errors, corrupt entries")
        m.create_observable_gauge(t.M_TIER_LATENCY, [self._tier_latency], unit="s",
                                  description="median latency of recent remote prefix-cache reads")

    def _summed(self, read):
        def callback(_: CallbackOptions):
            yield Observation(sum(read(e) for e in list(self.engines)))
        return callback

    def _tokens(self, _: CallbackOptions):
        observers = [e.observer for e in list(self.engines)]
        for kind in ("prompt", "cached", "output"):
            yield Observation(sum(o.tokens[kind] for o in observers), {"kind": kind})

    def _tiers(self):
        for e in list(self.engines):
            if e.prefix_cache is not None:
                yield e.prefix_cache.tier.stats

    def _tier_bytes(self, _: CallbackOptions):
        for st in self._tiers():
            yield Observation(st.bytes_read, {"tier": st.name, "direction": "read"})
            yield Observation(st.bytes_written, {"tier": st.name, "direction": "write"})

    def _tier_calls(self, _: CallbackOptions):
        for st in self._tiers():
            for kind in ("lookups", "hits", "errors", "corrupt", "dropped_writes"):
                yield Observation(getattr(st, kind), {"tier": st.name, "kind": kind})

    def _tier_latency(self, _: CallbackOptions):
        for st in self._tiers():
            yield Observation(st.as_dict()["read_ms_p50"] / 1e3, {"tier": st.name})

    def _expert_tokens(self, _: CallbackOptions):
        # summed per (layer, expert) over the live engines, whatever their shapes
        total: dict[tuple[int, int], int] = {}
        for e in list(self.engines):
            load = e.stats(expert_load=True).pool.expert_load
            for layer, row in enumerate(load.tolist()):
                for expert, n in enumerate(row):
                    total[layer, expert] = total.get((layer, expert), 0) + n
        for (layer, expert), n in total.items():
            yield Observation(n, {"layer": layer, "expert": expert})

_INSTRUMENTS: _Instruments | None = None


def instruments() -> _Instruments:
    global _INSTRUMENTS
    if _INSTRUMENTS is None:
        _INSTRUMENTS = _Instruments()
    return _INSTRUMENTS


class StepWork:
    """What the engine's steps computed since start, how long their parts took, and the last RING
    steps one by one: what capacity planning fits step times to (GetServerStats). Written by the
    engine thread only; readers on other threads see plain numbers, at most one step old.

    A step record (`recent`): [step, sequences, decode tokens, prefill tokens, context tokens, busy s,
    forward s, expert s, busiest worker's compute s, busy CPU s, forward CPU s, expert CPU s]. The
    engine thread's pass (busy) is closed by `end_pass`; a step's worker compute arrives with the next
    step's header."""

    RING = 4096
    __slots__ = ("steps", "sequences", "decode_tokens", "prefill_tokens", "context_tokens", "forward_seconds",
                 "forward_cpu_seconds", "recent", "_open", "_t0", "_c0", "_e0", "_ec0", "_workers")

    def __init__(self):
        self.steps = self.sequences = self.decode_tokens = self.prefill_tokens = self.context_tokens = 0
        self.forward_seconds = self.forward_cpu_seconds = 0.0
        self.recent: collections.deque = collections.deque(maxlen=self.RING)
        self._open = False
        self._t0 = self._c0 = self._e0 = self._ec0 = 0.0
        self._workers: list[float] = []

    def add(self, batch) -> None:
        dec = pre = ctx = 0
        for s in batch:
            seq, n = s.seq, s.num_tokens
            c = seq.num_computed_tokens
            # a decode token: one token past the prompt whose logits give the next token
            if n == 1 and c >= seq.num_prompt_tokens:
                dec += 1
            else:
                pre += n
            ctx += n * c + n * (n + 1) // 2  # each token attends to the cached context and the chunk up to it
        self.steps += 1
        self.sequences += len(batch)
        self.decode_tokens += dec
        self.prefill_tokens += pre
        self.context_tokens += ctx
        self.recent.append([self.steps, len(batch), dec, pre, ctx, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        self._open = True

    def begin(self, dispatcher: Dispatcher) -> None:
        self._t0, self._c0 = time.perf_counter(), time.thread_time()
        self._e0, self._ec0 = dispatcher.expert_seconds, dispatcher.expert_cpu_seconds

    def end(self, dispatcher: Dispatcher) -> None:
        wall, cpu = time.perf_counter() - self._t0, time.thread_time() - self._c0
        self.forward_seconds += wall
        self.forward_cpu_seconds += cpu
        rec = self.recent[-1]
        rec[6], rec[10] = wall, cpu
        rec[7] = dispatcher.expert_seconds - self._e0
        rec[11] = dispatcher.expert_cpu_seconds - self._ec0
        workers = list(dispatcher.worker_compute_seconds)
        if workers and len(workers) == len(self._workers) and len(self.recent) >= 2:
            # this step's header carried the workers' totals through the previous step
            self.recent[-2][8] = max(b - a for a, b in zip(self._workers, workers))
        self._workers = workers

    def end_pass(self, busy: float, busy_cpu: float) -> None:
        """The engine thread's pass that ran the last step took `busy` seconds (`busy_cpu` of its CPU)."""
        if self._open:
            self.recent[-1][5], self.recent[-1][9] = busy, busy_cpu
            self._open = False

    def since(self, step: int) -> list[list]:
        """The kept records of the steps numbered above `step`, oldest first. Safe from another thread:
        the ring is copied in one call (the engine thread may append meanwhile; iterating it would then
        fail), and its step numbers are consecutive."""
        recs = list(self.recent)
        if not recs or recs[-1][0] <= step:
            return []
        return [list(r) for r in recs[max(0, step - recs[0][0] + 1):]]


class LatencyWindow:
    """The latest TTFT and TPOT samples (seconds, with the time each was taken), for a reader in
    another thread that asks for a percentile over the last few seconds (the autoscaler's SLO check).
    Bounded: the newest `size` samples of each."""

    def __init__(self, size: int = 4096):
        self._samples = {"ttft": collections.deque(maxlen=size), "tpot": collections.deque(maxlen=size)}
        self._lock = threading.Lock()

    def add(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._samples[kind].append((time.monotonic(), seconds))

    def percentile(self, kind: str, q: float, since_s: float) -> tuple[float, int]:
        """(q-th percentile (nearest rank) of the samples of the last `since_s` seconds, how many);
        (0.0, 0) without samples."""
        cutoff = time.monotonic() - since_s
        with self._lock:
            xs = sorted(v for t_, v in self._samples[kind] if t_ >= cutoff)
        if not xs:
            return 0.0, 0
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], len(xs)


class EngineObserver:
    def __init__(self, engine):
        # A weak reference: the engine owns its observer, and a cycle would keep the engine (and its
        # KV pool) alive until the garbage collector happens to run.
        self._engine = weakref.ref(engine)
        self.tracer = t.tracer()
        self.m = instruments()
        self.m.engines.add(engine)
        self._layer_seconds: list[float] | None = None
        self._bytes = 0
        self.tokens = {"prompt": 0, "cached": 0, "output": 0}  # read by the M_TOKENS callback
        self.work = StepWork()  # read by GetServerStats (capacity planning)
        self.latencies = LatencyWindow()  # recent TTFT/TPOT, read by the expert pool's autoscaler

    # ---- request lifecycle ---------------------------------------------------------------------
    def on_add(self, seq: Sequence) -> None:
        parent = seq.request.trace_context
        seq.trace_parent = parent
        seq.queue_span = self.tracer.start_span(t.SPAN_QUEUE, context=parent,
                                                attributes={t.ATTR_REQUEST_ID: seq.request_id})

    def on_admit(self, seq: Sequence) -> None:
        """First time `seq` is scheduled: the queue wait ends, the prefix lookup is known."""
        if seq.queue_span is not None:
            seq.queue_span.end()
            seq.queue_span = None
        now = time.time_ns()
        span = self.tracer.start_span(t.SPAN_PREFIX_LOOKUP, context=seq.trace_parent, start_time=now,
                                      attributes={t.ATTR_HIT_LOCAL: seq.cached_local,
                                                  t.ATTR_HIT_REMOTE: seq.cached_remote})
        span.end(end_time=now)
        self.tokens["prompt"] += seq.num_prompt_tokens
        self.tokens["cached"] += seq.cached_local + seq.cached_remote
        if seq.cached_local:
            self.m.prefix_hits.add(seq.cached_local, {"tier": "local"})
        if seq.cached_remote:
            self.m.prefix_hits.add(seq.cached_remote, {"tier": "redis"})

    def start_step(self, batch) -> trace.Span:
        self.work.add(batch)
        kinds = {"decode" if s.num_tokens == 1 else "prefill" for s in batch}
        links = [trace.Link(ctx) for ctx in (_span_context(s.seq.trace_parent) for s in batch) if ctx]
        span = self.tracer.start_span(t.SPAN_STEP, links=links, context=None, attributes={
            t.ATTR_BATCH: len(batch), t.ATTR_TOKENS: sum(s.num_tokens for s in batch),
            t.ATTR_KIND: kinds.pop() if len(kinds) == 1 else "mixed"})
        for s in batch:
            if s.num_tokens > 1 or s.seq.num_new_tokens == 0:  # a prefill chunk of this request
                s.seq.chunk_span = self.tracer.start_span(
                    t.SPAN_PREFILL, context=s.seq.trace_parent, links=[trace.Link(span.get_span_context())],
                    attributes={t.ATTR_TOKENS: s.num_tokens})
        self.work.begin(self._engine().dispatcher)
        return span

    def end_step(self, span: trace.Span, batch) -> None:
        self.work.end(self._engine().dispatcher)
        for s in batch:
            chunk = s.seq.chunk_span
            if chunk is not None:
                chunk.end()
                s.seq.chunk_span = None
        span.end()
        d = self._engine().dispatcher
        seconds = d.layer_seconds  # [] without a transport
        if seconds:
            prev = self._layer_seconds or [0.0] * len(seconds)
            for now, before in zip(seconds, prev):
                if now > before:
                    self.m.dispatch_seconds.record(now - before)
            self._layer_seconds = list(seconds)
            total = d.total_bytes_sent + d.total_bytes_received
            if total > self._bytes:
                self.m.dispatch_bytes.add(total - self._bytes)
                self._bytes = total

    def on_token(self, seq: Sequence) -> None:
        self.tokens["output"] += 1
        if seq.num_new_tokens == 1:
            seq.first_token_time = time.time()
            self.m.ttft.record(seq.first_token_time - seq.request.arrival_time)
            self.latencies.add("ttft", seq.first_token_time - seq.request.arrival_time)
            seq.decode_span = self.tracer.start_span(t.SPAN_DECODE, context=seq.trace_parent)

    def on_finish(self, seq: Sequence, reason: str) -> None:
        now = time.time()
        if seq.queue_span is not None:  # aborted while waiting
            seq.queue_span.end()
            seq.queue_span = None
        span = seq.decode_span
        if span is not None:
            span.set_attribute(t.ATTR_TOKENS, seq.num_new_tokens)
            span.add_event("finish", {t.ATTR_FINISH: reason})
            span.end()
            seq.decode_span = None
        self.m.e2e.record(now - seq.request.arrival_time, {"finish_reason": reason})
        if seq.num_new_tokens > 1 and seq.first_token_time is not None:
            self.m.tpot.record((now - seq.first_token_time) / (seq.num_new_tokens - 1))
            self.latencies.add("tpot", (now - seq.first_token_time) / (seq.num_new_tokens - 1))


def _span_context(ctx):
    if ctx is None:
        return None
    sc = trace.get_current_span(ctx).get_span_context()
    return sc if sc.is_valid else None
