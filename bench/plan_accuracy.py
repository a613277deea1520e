"""Does `mesh plan` predict the deployment it recommends? Profile one shape at two rates, plan for 3x
and 10x the highest profiled rate, run what the plan recommends, and compare (the issue's targets:
TTFT p50 and TPOT p50 within +-25 %, throughput and goodput within +-10 %). Then measure how fast the
load generator itself can go.

Cases (each one `mesh serve` shape profiled, then each target's recommended shape measured):
  w2  profile `mesh serve --workers 2`; the plan may choose any shape (it recommends the gateway
      alone when that keeps up: experts move back into the gateway)
  w0  profile `mesh serve --workers 0`; the plan is asked for an expert pool of 2 workers
      (--expert-workers 2), so it recommends workers it never measured (their transport assumed)
Every server runs the `small` preset (16 experts top-4) in float32 with torch on 1 thread (the load
generator keeps the other core); requests have 64-token prompts and 16 output tokens, Poisson
arrivals. Each prediction is for exactly the requests its validation run sends (same seed).

    .venv/bin/python bench/plan_accuracy.py [--cases w2,w0] [--rates-w2 2,4] [--rates-w0 1,2]
                                            [--duration 30] [--validate-duration 30]

Prints JSON lines: `plan_accuracy.profile` per profiled level, `plan_accuracy` per (case, target) with
predicted, measured and error of each figure, then `plan_accuracy.summary`, then `loadgen_capacity`
per multiple of the highest rate the mesh completed in the run (against a null target).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import ROOT, emit, hardware

from mesh.plan.metrics import summarize
from mesh.plan.planner import plan
from mesh.plan.profile import build_model, lengths
from mesh.plan.search import Slo, Workload
from mesh.plan.workload import Dist, synthetic

PROMPT, OUTPUT = Dist.parse("64"), Dist.parse("16")
SERVE_ARGS = ["--dtype", "float32", "--kv-cache-memory", "256M"]
ENV = {"OMP_NUM_THREADS": "1"}
# what each figure must meet (relative error)
TARGETS = {"ttft_ms.p50": 0.25, "tpot_ms.p50": 0.25, "throughput_rps": 0.10, "goodput_rps": 0.10}
SLO = Slo(ttft_ms=500.0, tpot_ms=100.0, percentile=90.0)  # goodput counts the requests within both


def load() -> dict:
    """The machine's load right now: what else runs beside the benchmark."""
    with open("/proc/loadavg") as f:
        one, five, fifteen = (float(x) for x in f.read().split()[:3])
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cores": os.cpu_count()}


def run_case(name: str, workers: int, rates: list[float], pools: list[int] | None, args, model_dir) -> tuple[list[dict], float]:
    """The case's rows, and the highest rate any of its runs completed (req/s)."""
    from router_service.loadtest.profiler import Sweep, Workload as Work, profile_shapes
    from router_service.loadtest.validate import validate
    out = ROOT / "bench" / "out" / "plan_accuracy" / name
    work = Work(PROMPT, OUTPUT)
    sweep = Sweep(duration=args.duration, rates=rates, seed=args.seed)
    t = time.perf_counter()
    reports = profile_shapes([workers], sweep, work, out / "profile", model=str(model_dir), serve_args=SERVE_ARGS,
                             env=ENV, progress=sys.stderr)
    for r in reports[0]["runs"]:
        emit({"bench": "plan_accuracy.profile", "case": name, "workers": workers, "rate": r["rate"],
              "requests": r["requests"], "ttft_ms_p50": r["ttft_ms"]["p50"], "tpot_ms_p50": r["tpot_ms"]["p50"],
              "throughput_rps": round(r["throughput_rps"], 3), "generator_bottleneck": r["generator_bottleneck"]})
    model = build_model(reports)
    workload = Workload.poisson(lengths(reports), 1500, args.seed)
    rows = []
    for mult in (3, 10):
        target = max(rates) * mult
        result = plan(model, workload, target, SLO, num_experts=model.num_experts, max_devices=8, pool_sizes=pools)
        result["hardware"] = "cpu"
        if not result["feasible"]:
            emit({"bench": "plan_accuracy", "case": name, "target_rps": target, "feasible": False,
                  "reason": result["reason"]})
            continue
        v = validate(result, model, work, duration=args.validate_duration, seed=args.seed, model_dir=str(model_dir),
                     serve_args=SERVE_ARGS, env=ENV, slo=SLO, out_dir=out / f"validate-{mult}x")
        figures = {r["key"]: {"predicted": r["predicted"], "measured": r["measured"],
                              "error_pct": None if r["error_pct"] is None else round(r["error_pct"], 1),
                              "interval": r["interval"]} for r in v["rows"]}
        ok = {k: figures[k]["error_pct"] is not None and abs(figures[k]["error_pct"]) <= 100 * tol
              for k, tol in TARGETS.items()}
        rec = {"bench": "plan_accuracy", "case": name, "profiled_workers": workers, "profile_rates": rates,
               "target_rps": target, "multiple": mult,
               "recommended": {k: result[k] for k in ("gateways", "expert_workers", "redundant_experts")},
               "extrapolation": result["extrapolation"], "assumptions": [a["what"] for a in result["assumptions"]],
               "requests": v["requests"], "figures": figures, "within_targets": ok,
               "generator_bottleneck": v["generator_bottleneck"], "load": load()}
        emit(rec)
        rows.append(rec)
    emit({"bench": "plan_accuracy.fit", "case": name, "model": model.as_dict(), "seconds": round(time.perf_counter() - t)})
    done = [r["throughput_rps"] for r in reports[0]["runs"]] + [f["figures"]["throughput_rps"]["measured"] for f in rows]
    return rows, max(done)


def generator_capacity(capacity_rps: float, multiples: list[float], duration: float) -> None:
    """The load generator against a null target at multiples of the highest rate the mesh completed."""
    import asyncio
    import subprocess
    from router_service.client import MeshClient
    from router_service.loadtest.generator import LoadGenerator, Prompts, RunSpec
    from router_service.loadtest.localserve import free_port
    port = free_port()
    log = open(ROOT / "bench" / "out" / "nulltarget.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "router_service.loadtest.nulltarget", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
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
            emit({"bench": "loadgen_capacity", "mesh_completed_rps": round(capacity_rps, 2), "multiple": k,
                  "offered_rps": round(capacity_rps * k, 1), "achieved_send_rps": round(g["achieved_send_rps"], 1),
                  "completed": g["completed"], "failed": g["failed"],
                  "send_lag_ms_p99": round(g["send_lag_ms"]["p99"] or 0, 2),
                  "loop_lag_ms_p99": round(g["loop_lag_ms"]["p99"] or 0, 2),
                  "generator_cpu_util": round(g["cpu_util"] or 0, 2), "generator_bottleneck": g["bottleneck"],
                  "reasons": g["reasons"]})
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="w2,w0", help="which cases to run: w2, w0 (default both)")
    ap.add_argument("--rates-w2", default="2,4", help="profiled rates of --workers 2, req/s (default 2,4)")
    ap.add_argument("--rates-w0", default="1,2", help="profiled rates of --workers 0, req/s (default 1,2)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per profiled level (default 30)")
    ap.add_argument("--validate-duration", type=float, default=30.0, help="seconds per validation run (default 30)")
    ap.add_argument("--multiples", default="10,20", help="generator test: multiples of the highest rate the mesh "
                                                         "completed ('' skips it)")
    ap.add_argument("--gen-duration", type=float, default=6.0, help="seconds per generator-capacity run")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    from common import bench_model
    model_dir = bench_model("qwen3_moe", "small")
    emit({"bench": "plan_accuracy.start", "hardware": hardware(), "load": load()})
    rows, capacity = [], 0.0
    cases = {"w2": (2, args.rates_w2, None), "w0": (0, args.rates_w0, [2])}
    for name in args.cases.split(","):
        workers, rates, pools = cases[name]
        got, cap = run_case(name, workers, [float(x) for x in rates.split(",")], pools, args, model_dir)
        rows += got
        capacity = max(capacity, cap)
    emit({"bench": "plan_accuracy.summary", "runs": len(rows),
          "all_within_targets": all(all(r["within_targets"].values()) for r in rows) if rows else None,
          "misses": [{"case": r["case"], "target_rps": r["target_rps"], "figure": k, "error_pct": r["figures"][k]["error_pct"]}
                     for r in rows for k, ok in r["within_targets"].items() if not ok], "load": load()})
    if args.multiples and capacity:
        generator_capacity(capacity, [float(x) for x in args.multiples.split(",")], args.gen_duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
