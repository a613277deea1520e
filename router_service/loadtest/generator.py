"""The load generator: open-loop (Poisson/constant/trace arrivals) or closed-loop (fixed concurrency)
streams of Generate calls over grpc.aio, with per-request records and a watch on itself.

Open loop: requests are sent at their scheduled times whatever the server does (arrivals do not wait
for completions), which is how independent callers behave; with `concurrency` as well, at most that
many are in flight and an arrival waits for a free slot. Closed loop (no rate): `concurrency`
callers each send the next request as soon as their previous one ends.

The generator must not be the bottleneck. It records, per request, the lag between the scheduled and
the actual send, and runs a heartbeat that measures how late the event loop wakes up; when either
lag's p99 exceeds `max_lag_ms`, the run is flagged `generator_bottleneck` (its latencies then partly
measure the generator). It also polls GetServerStats every `poll_interval` s: the server's step
counter and queues, which the planner's step-time fit and the report's timeline use.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import numpy as np

from mesh.plan.metrics import percentile
from mesh.plan.workload import RequestSpec, arrival_offsets
from router_service.client import stats_dict
from router_service.protos import inference_pb2 as pb
from router_service.protos import inference_pb2_grpc as pb_grpc

TENANT_HEADER = "x-tenant-id"
_FINISH = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_ABORT: "abort"}


@dataclass
class RunSpec:
    """One load level."""
    rate: float | None  # requests/s; None: closed loop
    duration: float  # seconds of sending
    concurrency: int | None = None  # closed-loop callers, or the in-flight cap of an open loop
    arrival: str = "poisson"  # poisson | constant | trace
    seed: int = 0
    timeout: float | None = None  # per-request deadline, seconds
    drain_timeout: float = 60.0  # after sending stops, wait this long for the rest, then cancel
    temperature: float = 0.0
    max_lag_ms: float = 50.0
    poll_interval: float = 0.25

    def __post_init__(self) -> None:
        if self.rate is None and not self.concurrency:
            raise ValueError("a run needs a rate (open loop) or a concurrency (closed loop)")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.duration <= 0:
            raise ValueError(f"duration must be positive, got {self.duration}")

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        return f"{self.rate:g} req/s" + (f" (<= {self.concurrency} in flight)" if self.concurrency else "")


class Prompts:
    """RequestSpec -> GenerateRequest. Token prompts are random ids in [0, vocab); a request with a
    prefix_id starts with that prefix's own fixed ids (per tenant), so repeats hit the prefix cache."""

    def __init__(self, vocab_size: int, seed: int = 0, temperature: float = 0.0):
        self.vocab = max(2, vocab_size)
        self.rng = np.random.default_rng(seed)
        self.temperature = temperature
        self._prefixes: dict[tuple[str, str, int], list[int]] = {}

    def _prefix(self, tenant: str, pid: str, n: int) -> list[int]:
        key = (tenant, pid, n)
        ids = self._prefixes.get(key)
        if ids is None:
            seed = int.from_bytes(hashlib.sha256(f"{tenant}\0{pid}".encode()).digest()[:8], "little")
            ids = np.random.default_rng(seed).integers(0, self.vocab, n).tolist()
            self._prefixes[key] = ids
        return ids

    def build(self, s: RequestSpec, request_id: str = "") -> pb.GenerateRequest:
        sp = pb.SamplingParams(max_tokens=s.output_tokens, temperature=self.temperature, ignore_eos=True)
        if s.prompt is not None:
            return pb.GenerateRequest(request_id=request_id, prompt=s.prompt, sampling=sp)
        head = self._prefix(s.tenant, s.prefix_id, s.prefix_tokens) if s.prefix_id and s.prefix_tokens else []
        tail = self.rng.integers(0, self.vocab, s.prompt_tokens - len(head)).tolist()
        return pb.GenerateRequest(request_id=request_id, prompt_token_ids=head + tail, sampling=sp)


@dataclass
class RunResult:
    spec: RunSpec
    records: list[dict]
    polls: list[dict]  # {"t", "steps", "running", "waiting", "kv_blocks_used", "kv_blocks_free", "in_flight", "rtt_ms"}
    stats_before: dict | None
    stats_after: dict | None
    generator: dict = field(default_factory=dict)
    steps: list[list] = field(default_factory=list)  # the server's step records (STEP_COLUMNS), in order


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    def __init__(self, stream, label: str, duration: float):
        self.stream, self.label, self.duration = stream, label, duration
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def update(self, elapsed: float, sent: int, done: int, failed: int, inflight: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and not self.tty and now - self._last < 5.0:
            return
        self._last = now
        elapsed = max(elapsed, 0.0)
        frac = min(elapsed / self.duration, 1.0)
        bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
        phase = "draining" if elapsed > self.duration and not final else ""
        line = (f"[{self.label}] [{bar}] {min(elapsed, self.duration):5.1f}/{self.duration:g}s sent {sent} "
                f"done {done} failed {failed} in flight {inflight} {phase}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class LoadGenerator:
    """Drives one target. Use `await gen.run(spec, requests)` per load level, inside one event loop."""

    def __init__(self, target: str, channels: int = 4, progress_stream=None, security: dict | None = None):
        """`security`: MeshClient's keyword arguments for TLS and a bearer token (token, tls, tls_ca,
        tls_cert, tls_key, tls_server_name); None: plain text."""
        sec = security or {}
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        token = sec.get("token")
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        # Several HTTP/2 connections: one connection's flow control and its single I/O path would
        # otherwise cap thousands of concurrent streams.
        if sec.get("tls") or sec.get("tls_ca") or sec.get("tls_cert"):
            from router_service.tls import client_credentials
            creds = client_credentials(sec.get("tls_ca"), sec.get("tls_cert"), sec.get("tls_key"))
            if sec.get("tls_server_name"):
                opts.append(("grpc.ssl_target_name_override", sec["tls_server_name"]))
            self._channels = [grpc.aio.secure_channel(target, creds, options=opts + [("grpc.channel_id", i)])
                              for i in range(max(1, channels))]
        else:
            self._channels = [grpc.aio.insecure_channel(target, options=opts + [("grpc.channel_id", i)])
                              for i in range(max(1, channels))]
        self._stubs = [pb_grpc.InferenceStub(c) for c in self._channels]
        self.target = target
        self.progress_stream = progress_stream

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def model_info(self, timeout: float = 30.0) -> dict:
        msg = await self._stubs[0].GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, wait_for_ready=True,
                                                metadata=self._auth or None)
        return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}

    async def server_stats(self, timeout: float = 10.0) -> dict | None:
        """None when the server does not implement GetServerStats."""
        try:
            return stats_dict(await self._stubs[0].GetServerStats(pb.GetServerStatsRequest(), timeout=timeout,
                                                                  metadata=self._auth or None))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    async def rtt_ms(self, n: int = 20) -> float | None:
        """Median round trip of a trivial call (GetModelInfo): the fixed client<->server latency."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await self._stubs[0].GetModelInfo(pb.GetModelInfoRequest(), timeout=10.0, metadata=self._auth or None)
            times.append((time.perf_counter() - t) * 1000.0)
        return percentile(times, 50)

    async def run(self, spec: RunSpec, requests: Iterator[RequestSpec], prompts: Prompts,
                  schedule: list[float] | None = None, run_index: int = 0) -> RunResult:
        """Send one load level. `requests`: the request specs, drawn in order; `schedule`: arrival
        offsets for arrival "trace" (each spec's own offset_s otherwise comes from `arrival`)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        now = lambda: loop.time() - t0  # noqa: E731
        records: list[dict] = []
        tasks: set[asyncio.Task] = set()
        counts = {"sent": 0, "done": 0, "failed": 0}
        lags: list[float] = []
        stubs = itertools.cycle(self._stubs)
        sem = asyncio.Semaphore(spec.concurrency) if spec.concurrency else None

        async def one(i: int, s: RequestSpec, msg: pb.GenerateRequest, intended: float) -> None:
            sent = now()
            rec = {"run": run_index, "i": i, "tenant": s.tenant, "prefix_id": s.prefix_id,
                   "intended_s": intended, "sent_s": sent, "first_token_s": None, "end_s": None,
                   "prompt_tokens": len(msg.prompt_token_ids) or s.prompt_tokens, "cached_tokens": 0,
                   "output_tokens": 0, "itl_ms": [], "code": "OK", "error": "", "finish_reason": None}
            records.append(rec)
            counts["sent"] += 1
            md = (((TENANT_HEADER, s.tenant),) if s.tenant else ()) + self._auth or None
            call = next(stubs).Generate(msg, metadata=md, timeout=spec.timeout)
            last, itl, out = None, rec["itl_ms"], 0
            try:
                async for resp in call:
                    t = now()
                    n = len(resp.token_ids)
                    if n:
                        if last is None:
                            rec["first_token_s"] = t
                        else:
                            itl.append(round((t - last) * 1000.0, 3))
                            itl.extend([0.0] * (n - 1))
                        last = t
                        out += n
                    if resp.HasField("usage"):
                        rec["prompt_tokens"] = resp.usage.prompt_tokens or rec["prompt_tokens"]
                        rec["cached_tokens"] = resp.usage.cached_tokens
                    if resp.finish_reason:
                        rec["finish_reason"] = _FINISH.get(resp.finish_reason)
                if rec["finish_reason"] == "abort":
                    rec["code"], rec["error"] = "ABORTED", "the server aborted the request"
            except grpc.aio.AioRpcError as e:
                rec["code"], rec["error"] = e.code().name, e.details() or ""
            except asyncio.CancelledError:
                call.cancel()
                rec["code"], rec["error"] = "CANCELLED", "still running when the drain timeout ended"
            finally:
                rec["end_s"] = now()
                rec["output_tokens"] = out
                counts["done" if rec["code"] == "OK" else "failed"] += 1
                if sem is not None:
                    sem.release()

        def launch(i: int, s: RequestSpec, msg, intended: float) -> asyncio.Task:
            task = asyncio.create_task(one(i, s, msg, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return task

        async def open_loop() -> None:
            offsets = schedule if schedule is not None else arrival_offsets(spec.arrival, spec.rate, spec.duration, spec.seed)
            for i, off in enumerate(offsets):
                if off >= spec.duration:
                    break
                s = next(requests, None)
                if s is None:
                    break
                msg = prompts.build(s, f"r{run_index}-{i}")
                ready = off
                if sem is not None:
                    await sem.acquire()
                    ready = max(off, now())  # waiting for a slot is intended, not generator lag
                delay = off - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(max(0.0, now() - ready) * 1000.0)
                launch(i, s, msg, off)

        async def closed_loop() -> None:
            ids = itertools.count()

            async def caller() -> None:
                while now() < spec.duration:
                    s = next(requests, None)
                    if s is None:
                        return
                    await sem.acquire()
                    i = next(ids)
                    await one(i, s, prompts.build(s, f"r{run_index}-{i}"), now())
            await asyncio.gather(*(caller() for _ in range(spec.concurrency)))

        loop_lags: list[float] = []
        polls: list[dict] = []
        stats_before = await self.server_stats()
        stop = asyncio.Event()

        async def heartbeat() -> None:
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.02)
                loop_lags.append(max(0.0, loop.time() - t - 0.02) * 1000.0)

        step_log: list[list] = []
        cursor = [int((stats_before or {}).get("steps") or 0)]

        async def poll_once() -> bool:
            t = now()
            try:
                st = await self._stubs[0].GetServerStats(pb.GetServerStatsRequest(steps_after=cursor[0]), timeout=5.0)
            except grpc.aio.AioRpcError:
                return False  # an old server (UNIMPLEMENTED) or one going away: no timeline
            t1 = now()
            # the newest two records may still be completing (the engine thread's pass, the workers'
            # compute that arrives with the next step's header): they come with the next poll
            last = max((r.step for r in st.recent_steps), default=0) - 2
            for r in st.recent_steps:
                if r.step > last:
                    break
                step_log.append([r.step, r.sequences, r.decode_tokens, r.prefill_tokens, r.context_tokens,
                                 r.busy_seconds, r.forward_seconds, r.expert_seconds, r.worker_compute_seconds,
                                 r.busy_cpu_seconds, r.forward_cpu_seconds, r.expert_cpu_seconds])
                cursor[0] = r.step
            polls.append({"t": (t + t1) / 2, "steps": st.steps, "running": st.running, "waiting": st.waiting,
                          "kv_blocks_used": st.kv_blocks_used, "kv_blocks_free": st.kv_blocks_free,
                          "in_flight": st.in_flight, "rtt_ms": (t1 - t) * 1000.0, **step_counters(st)})
            return True

        async def poller() -> None:
            while not stop.is_set() and await poll_once():
                try:
                    await asyncio.wait_for(stop.wait(), spec.poll_interval)
                except asyncio.TimeoutError:
                    pass

        bar = Progress(self.progress_stream, spec.label, spec.duration) if self.progress_stream else None

        async def show() -> None:
            while not stop.is_set():
                bar.update(now(), counts["sent"], counts["done"], counts["failed"],
                           counts["sent"] - counts["done"] - counts["failed"])
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass

        cpu0, wall0 = time.process_time(), time.perf_counter()
        side = [asyncio.create_task(heartbeat()), asyncio.create_task(poller())]
        if bar is not None:
            side.append(asyncio.create_task(show()))
        await (open_loop() if spec.rate is not None else closed_loop())
        send_end = now()
        cpu_send = time.process_time() - cpu0
        if tasks:
            _done, pending = await asyncio.wait(set(tasks), timeout=spec.drain_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        stop.set()
        await asyncio.gather(*side, return_exceptions=True)
        if polls:
            await poll_once()  # the counters after the last response
        if bar is not None:
            bar.update(now(), counts["sent"], counts["done"], counts["failed"], 0, final=True)
        stats_after = await self.server_stats() if stats_before is not None else None
        wall = time.perf_counter() - wall0
        records.sort(key=lambda r: r["sent_s"])
        return RunResult(spec, records, polls, stats_before, stats_after,
                         self._health(spec, lags, loop_lags, records, send_end, cpu_send, time.process_time() - cpu0, wall),
                         step_log)

    @staticmethod
    def _health(spec: RunSpec, lags, loop_lags, records, send_end, cpu_send, cpu_total, wall) -> dict:
        lag99, loop99 = percentile(lags, 99), percentile(loop_lags, 99)
        sent = len(records)
        span = send_end if send_end > 0 else spec.duration
        reasons = []
        if lag99 is not None and lag99 > spec.max_lag_ms:
            reasons.append(f"send lag p99 {lag99:.1f} ms > {spec.max_lag_ms:g} ms")
        if loop99 is not None and loop99 > spec.max_lag_ms:
            reasons.append(f"event-loop lag p99 {loop99:.1f} ms > {spec.max_lag_ms:g} ms")
        return {
            "bottleneck": bool(reasons), "reasons": reasons,
            "send_lag_ms": {"p50": percentile(lags, 50), "p99": lag99, "max": max(lags, default=None)},
            "loop_lag_ms": {"p50": percentile(loop_lags, 50), "p99": loop99, "max": max(loop_lags, default=None)},
            "achieved_send_rps": sent / span if span > 0 else None,
            "offered_rps": spec.rate,
            "cpu_util_sending": cpu_send / span if span > 0 else None,
            "cpu_util": cpu_total / wall if wall > 0 else None,
            "max_lag_ms": spec.max_lag_ms,
        }


def step_counters(st: pb.ServerStats) -> dict:
    """The server's cumulative step-time counters in a poll (absent from servers that predate them:
    their busy_seconds stays 0 while steps grow)."""
    return {"seqs": st.scheduled_sequences, "decode": st.decode_tokens, "prefill": st.prefill_tokens,
            "ctx": st.context_tokens, "busy_s": st.busy_seconds, "forward_s": st.forward_seconds,
            "expert_s": st.expert_seconds, "worker_s": list(st.worker_compute_seconds),
            "busy_cpu_s": st.busy_cpu_seconds, "forward_cpu_s": st.forward_cpu_seconds,
            "expert_cpu_s": st.expert_cpu_seconds, "arrival_hop_s": st.arrival_hop_seconds, "arrivals": st.arrivals,
            "delivery_hop_s": st.delivery_hop_seconds, "deliveries": st.deliveries}


def trace_schedule(specs: list[RequestSpec], duration: float | None) -> list[float]:
    """The offsets of a trace replayed as recorded (relative to its first request)."""
    missing = [i for i, s in enumerate(specs) if s.offset_s is None]
    if missing:
        raise ValueError(f"--arrival trace needs offset_s on every line; request {missing[0] + 1} has none")
    base = specs[0].offset_s
    return [s.offset_s - base for s in specs if duration is None or s.offset_s - base < duration]


def cycle(specs: list[RequestSpec]) -> Iterator[RequestSpec]:
    return itertools.cycle(specs) if specs else iter(())

