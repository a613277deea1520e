"""Validation of `mesh plan` on this machine: profile the mesh at two rates, predict a third, measure
it, and print predicted against measured; then measure how fast the load generator itself can go.

1. `mesh serve` (the `small` preset, experts in-process) in a subprocess, its torch on 1 thread so the
   generator keeps a core.
2. `mesh loadtest` at --profile-rates (Poisson arrivals, prompts uniform 64..192, 32 output tokens);
   the planner fits and calibrates its step-time model from that report alone.
3. Prediction at --predict-rate for exactly the requests the next run will send (same seed: same
   arrivals and lengths), then that run is measured. Target: throughput and p50 TTFT within +-15%.
4. Generator capacity: a null target (router_service.loadtest.nulltarget, no model) in another
   process; the generator runs at multiples of the mesh's capacity (the calibrated model's highest
   sustainable rate) and reports whether it kept its schedule (send lag, event-loop lag).

    .venv/bin/python bench/plan_accuracy.py [--profile-rates 6,22] [--predict-rate 14] [--duration 40]

Prints JSON lines: one per run, then {"bench": "plan_accuracy", ...predicted vs measured...}, then
{"bench": "loadgen_capacity", ...} per multiple.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import ROOT, emit, hardware

from mesh.plan.metrics import summarize
from mesh.plan.perfmodel import Deployment
from mesh.plan.profile import build_model
from mesh.plan.search import Slo, Workload, max_rate
from mesh.plan.simulate import SimRequest, simulate
from mesh.plan.workload import Dist, arrival_offsets, synthetic

PROMPT, OUTPUT = Dist.parse("uniform:64:192"), Dist.parse("32")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loadtest(target: str, rates: list[float], duration: float, out, seed: int) -> dict:
    from router_service.loadtest.generator import RunSpec
    from router_service.loadtest.runner import LoadTest, run_loadtest
    lt = LoadTest(target=target, runs=[RunSpec(rate=r, duration=duration, seed=seed) for r in rates], out=out,
                  prompt=PROMPT, output=OUTPUT, progress=False, plots=False, seed=seed)
    rep = run_loadtest(lt)
    for r in rep["runs"]:
        emit({"bench": "plan_accuracy.run", "rate": r["rate"], "requests": r["requests"],
              "ttft_ms_p50": r["ttft_ms"]["p50"], "tpot_ms_p50": r["tpot_ms"]["p50"],
              "output_tokens_per_s": r["output_tokens_per_s"], "generator_bottleneck": r["generator_bottleneck"]})
    return rep


def the_requests(rate: float, duration: float, seed: int) -> list[SimRequest]:
    """What `loadtest(..., [rate], ..., seed)` sends as its first run: same arrival seed, same lengths."""
    lengths = synthetic(PROMPT, OUTPUT, seed)  # the runner's seed for run 0
    return [SimRequest(t, (s := next(lengths)).prompt_tokens, s.output_tokens)
            for t in arrival_offsets("poisson", rate, duration, seed)]


def err(pred: float, meas: float) -> float:
    return round(100.0 * (pred / meas - 1.0), 1)


def generator_capacity(capacity_rps: float, multiples: list[float], duration: float) -> None:
    import asyncio
    from router_service.loadtest.generator import LoadGenerator, Prompts, RunSpec
    port = free_port()
    log = open(ROOT / "bench" / "out" / "nulltarget.log", "w")
    proc = start([sys.executable, "-m", "router_service.loadtest.nulltarget", "--port", str(port)], log)
    try:
        from router_service.client import MeshClient
        with MeshClient(f"127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    c.model_info()
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        async def go(rate: float) -> dict:
            gen = LoadGenerator(f"127.0.0.1:{port}")
            try:
                res = await gen.run(RunSpec(rate=rate, duration=duration, seed=1), synthetic(PROMPT, Dist("fixed", 1), 1),
                                    Prompts(1000, 1))
            finally:
                await gen.close()
            s = summarize(res.records)
            return {**res.generator, "completed": s["requests"]["completed"], "failed": s["requests"]["failed"]}

        for k in multiples:
            g = asyncio.run(go(capacity_rps * k))
            emit({"bench": "loadgen_capacity", "mesh_capacity_rps": round(capacity_rps, 2), "multiple": k,
                  "offered_rps": round(capacity_rps * k, 1), "achieved_send_rps": round(g["achieved_send_rps"], 1),
                  "completed": g["completed"], "failed": g["failed"],
                  "send_lag_ms_p99": round(g["send_lag_ms"]["p99"] or 0, 2),
                  "loop_lag_ms_p99": round(g["loop_lag_ms"]["p99"] or 0, 2),
                  "generator_cpu_util": round(g["cpu_util"] or 0, 2), "generator_bottleneck": g["bottleneck"],
                  "reasons": g["reasons"]})
    finally:
        stop(proc)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-rates", default="6,22", help="requests/s of the profiling runs (default 6,22)")
    ap.add_argument("--predict-rate", type=float, default=14.0, help="the unmeasured rate to predict (default 14)")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per run (default 40)")
    ap.add_argument("--multiples", default="10,20", help="generator test: multiples of the mesh's capacity")
    ap.add_argument("--gen-duration", type=float, default=6.0, help="seconds per generator-capacity run")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    from common import bench_model
    model = bench_model("qwen3_moe", "small")
    out = ROOT / "bench" / "out" / "plan_accuracy"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = open(out / "serve.log", "w")
    server = start([sys.executable, "-m", "mesh.cli", "serve", "--model", str(model), "--port", str(port),
                    "--dtype", "float32", "--kv-cache-memory", "256M", "--log-level", "WARNING"], log,
                   env={"OMP_NUM_THREADS": "1"})
    try:
        from router_service.client import MeshClient
        with MeshClient(target) as c:
            c.wait_ready(120)
            c.complete(prompt_token_ids=list(range(1, 100)), max_tokens=8)  # warm up
        rates = [float(x) for x in args.profile_rates.split(",")]
        prof = loadtest(target, rates, args.duration, out / "profile", args.seed)
        t = time.perf_counter()
        m = build_model([prof])
        fit_s = time.perf_counter() - t
        dep = Deployment(1, m.measured_workers)
        reqs = the_requests(args.predict_rate, args.duration, args.seed)
        pred = summarize(simulate(reqs, m.cost(dep), m.limits, latency_s=m.latency_s))
        meas_rep = loadtest(target, [args.predict_rate], args.duration, out / "measure", args.seed)
        meas = meas_rep["runs"][0]
        rows = {}
        for key, p, q in (("output_tokens_per_s", pred["output_tokens_per_s"], meas["output_tokens_per_s"]),
                          ("ttft_ms_p50", pred["ttft_ms"]["p50"], meas["ttft_ms"]["p50"]),
                          ("tpot_ms_p50", pred["tpot_ms"]["p50"], meas["tpot_ms"]["p50"]),
                          ("e2e_ms_p50", pred["e2e_ms"]["p50"], meas["e2e_ms"]["p50"]),
                          ("ttft_ms_p90", pred["ttft_ms"]["p90"], meas["ttft_ms"]["p90"])):
            rows[key] = {"predicted": round(p, 2), "measured": round(q, 2), "error_pct": err(p, q)}
        ok = all(abs(rows[k]["error_pct"]) <= 15 for k in ("output_tokens_per_s", "ttft_ms_p50"))
        emit({"bench": "plan_accuracy", "profile_rates": rates, "predict_rate": args.predict_rate,
              "duration_s": args.duration, "requests": len(reqs), **rows, "within_15pct": ok,
              "fit": m.fit.as_dict(), "fit_seconds": round(fit_s, 2), "latency_ms": round(m.latency_s * 1e3, 3),
              "generator_bottleneck": meas["generator_bottleneck"], "hardware": hardware()})
        work = Workload.poisson([(r.prompt, 0, r.output) for r in reqs], 600, seed=1)
        capacity = max_rate(m, dep, work, Slo(), start=args.predict_rate)
        emit({"bench": "plan_accuracy.capacity", "predicted_capacity_rps": round(capacity, 2),
              "measured_max_throughput_rps": round(max(r["throughput_rps"] for r in prof["runs"] + meas_rep["runs"]), 2)})
    finally:
        stop(server)
        log.close()
    generator_capacity(capacity, [float(x) for x in args.multiples.split(",")], args.gen_duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
