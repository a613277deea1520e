"""What tracing costs the single-process engine: output tokens/s on the `bench` preset with tracing off,
sampled at 1%, and always on, in one run (plus a reference with the engine's instrumentation stubbed
out, which shows what "off" itself costs: the no-op OpenTelemetry API calls).

The SDK can be installed only once per process, so each mode is a child process of this script
(`--child MODE`), and the traced modes export over OTLP/gRPC to an `OtlpSink` that this process starts
(one sink per mode, so the spans counted are that mode's own and the export cost is real). Every
request carries a server-like root span, as the gRPC gateway's would, so the engine's request spans
hang under it. The children stay up side by side and run their repeats in turn, round-robin with a
rotating order, so that drift in background load falls on every mode alike. Each timed repeat ends
with a flush of the span processor, so the export of every span it made is inside the timing. The
sink decodes spans in this process, on the same cores (a collector would run elsewhere), so the
traced modes' numbers are, if anything, pessimistic. Besides wall-clock tokens/s, tokens per CPU
second of the child (all its threads, the exporter's included) is reported: on a shared machine it
is the steadier of the two. The verdict uses the paired ratio: the median over rounds of each round's
"off" time over the mode's time.

    .venv/bin/python bench/tracing_overhead.py [--requests 32] [--prompt-tokens 128] [--max-tokens 32]
                                               [--repeat 7] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from common import bench_model, emit, hardware, threads_from_env

# name -> OTEL_* variables of the child (besides the endpoint, set for every traced mode)
MODES = {
    "stubbed": None,  # instrumentation replaced by empty methods: the reference for "off"
    "off": {},
    "sampled_1pct": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "always_on": {"OTEL_TRACES_SAMPLER": "always_on"},
}
TARGET_OVERHEAD_PCT = 5.0


# ---- child: one mode, driven over stdin/stdout ----------------------------------------------------
def _prompts(seed: int, n: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)  # the same prompts in every mode; fresh ones per repeat (no prefix hits)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def _stub_observer(engine) -> None:
    from opentelemetry.trace import INVALID_SPAN

    class Stub:
        def on_add(self, seq): pass
        def on_admit(self, seq): seq.queue_span = None
        def start_step(self, batch): return INVALID_SPAN
        def end_step(self, span, batch): pass
        def on_token(self, seq): pass
        def on_finish(self, seq, reason): pass
    engine.observer = Stub()


def _run_once(engine, prompts, max_tokens: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (all threads of this process, the exporter's included) and output
    tokens for the batch, each request under its own server-like root span."""
    from opentelemetry import trace

    from mesh import telemetry
    from mesh.types import SamplingParams

    tracer = telemetry.tracer()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    roots: dict = {}
    tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for prompt in prompts:
        root = tracer.start_span("mesh.v1.Inference/Generate", kind=trace.SpanKind.SERVER,
                                 attributes={"rpc.system": "grpc", "rpc.service": "mesh.v1.Inference",
                                             "rpc.method": "Generate"})
        req = engine.make_request(prompt_token_ids=prompt, sampling=sp,
                                  trace_context=trace.set_span_in_context(root))
        roots[req.request_id] = root
        engine.add_request(req)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                roots.pop(out.request_id).end()
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush()  # the export of this repeat's spans is part of its cost
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def child(args) -> int:
    threads_from_env()
    from mesh import telemetry
    from mesh.config import EngineConfig
    from mesh.engine.engine import Engine

    telemetry.setup("mesh-bench")
    engine = Engine(args.model, EngineConfig(dtype=args.dtype, kv_cache_memory=256 << 20))
    if args.child == "stubbed":
        _stub_observer(engine)
    vocab = engine.model_config.vocab_size
    _run_once(engine, _prompts(999, args.requests, args.prompt_tokens, vocab), args.max_tokens)  # warm-up
    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seconds, cpu, tokens = _run_once(engine, _prompts(1000 + int(cmd[1]), args.requests, args.prompt_tokens,
                                                          vocab), args.max_tokens)
        print(json.dumps({"event": "done", "seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}), flush=True)
    telemetry.shutdown()
    return 0


# ---- parent ----------------------------------------------------------------------------------------
def _cpu_stall_us() -> int | None:
    """Linux PSI: total microseconds in which some runnable task waited for a CPU (None without PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


class Child:
    def __init__(self, mode: str, args, endpoint: str | None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        if endpoint is not None:
            env.update(MODES[mode], OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", str(args.model),
               "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
               "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
        self.mode = mode
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"tracing_overhead: the {self.mode!r} child exited with {self.proc.wait()}")
        return json.loads(line)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=7,
                   help="timed runs per mode, interleaved across modes; the median is reported (default 7)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from router_service.otlp_sink import OtlpSink

    args.model = bench_model()
    emit({"bench": "tracing_overhead", "hardware": hardware(), "model": str(args.model), "dtype": args.dtype,
          "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
          "repeat": args.repeat})
    sinks = {m: OtlpSink() for m, env in MODES.items() if env}
    children: dict[str, Child] = {}
    try:
        # Started one after another: loading and warming up concurrently would only slow each other.
        for mode in MODES:
            children[mode] = c = Child(mode, args, sinks[mode].endpoint if mode in sinks else None)
            c.read()  # ready: warmed up, its warm-up spans flushed
        before = {m: len(s.snapshot()) for m, s in sinks.items()}
        stall0, t0 = _cpu_stall_us(), time.monotonic()
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        order = list(MODES)
        for r in range(args.repeat):
            for mode in order[r % len(order):] + order[:r % len(order)]:
                children[mode].send(f"run {r}")
                done = children[mode].read()
                runs[mode].append(done)
        stall1, elapsed = _cpu_stall_us(), time.monotonic() - t0
        for c in children.values():
            c.send("quit")
            c.proc.stdin.close()
            if c.proc.wait(timeout=120) != 0:
                raise SystemExit(f"tracing_overhead: the {c.mode!r} child failed")
    finally:
        for c in children.values():
            if c.proc.poll() is None:
                c.proc.kill()
        for s in sinks.values():
            s.stop()

    tok_s = {m: statistics.median(d["tokens"] / d["seconds"] for d in rs) for m, rs in runs.items()}
    tok_cpu = {m: statistics.median(d["tokens"] / d["cpu_seconds"] for d in rs) for m, rs in runs.items()}
    # Runs of one round are neighbours in time: their ratio cancels slow drift in background load.
    paired = {m: statistics.median(runs["off"][r]["seconds"] / rs[r]["seconds"] for r in range(args.repeat))
              for m, rs in runs.items()}
    for mode, rs in runs.items():
        spans = len(sinks[mode].snapshot()) - before[mode] if mode in sinks else 0
        emit({"mode": mode, "otel_env": MODES[mode], "output_tok_s": round(tok_s[mode], 1),
              "runs_tok_s": [round(d["tokens"] / d["seconds"], 1) for d in rs],
              "output_tok_per_cpu_s": round(tok_cpu[mode], 1), "output_tokens_per_run": rs[0]["tokens"],
              "spans_exported": spans, "spans_per_request": round(spans / (args.requests * args.repeat), 2),
              "ratio_to_off": round(tok_s[mode] / tok_s["off"], 4),
              "paired_ratio_to_off": round(paired[mode], 4),
              "cpu_ratio_to_off": round(tok_cpu[mode] / tok_cpu["off"], 4)})

    def pct(ratio: float) -> float:
        return round(100 * (1 - ratio), 2)
    traced = ("sampled_1pct", "always_on")
    off = [d["tokens"] / d["seconds"] for d in runs["off"]]
    emit({"summary": "tracing_overhead",
          "overhead_pct_vs_off": {m: pct(tok_s[m] / tok_s["off"]) for m in traced},
          "paired_overhead_pct_vs_off": {m: pct(paired[m]) for m in traced},
          "cpu_overhead_pct_vs_off": {m: pct(tok_cpu[m] / tok_cpu["off"]) for m in traced},
          "off_overhead_pct_vs_stubbed": {"wall": pct(tok_s["off"] / tok_s["stubbed"]),
                                          "paired": pct(1 / paired["stubbed"]),
                                          "cpu": pct(tok_cpu["off"] / tok_cpu["stubbed"])},
          # How far to trust the above: spread of the "off" runs, and the share of the timed phase in
          # which some task on this machine waited for a CPU (other tenants' load; 0 on a quiet box).
          "off_runs_spread_pct": round(100 * (max(off) - min(off)) / statistics.median(off), 1),
          "cpu_pressure_pct": (round(100 * (stall1 - stall0) / 1e6 / elapsed, 1)
                               if stall0 is not None and stall1 is not None else None),
          "target_always_on_pct": TARGET_OVERHEAD_PCT,
          "always_on_within_target": pct(paired["always_on"]) <= TARGET_OVERHEAD_PCT})
    return 0


if __name__ == "__main__":
    sys.exit(main())
