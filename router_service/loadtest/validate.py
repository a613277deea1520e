"""`mesh plan --validate`: run the recommended deployment here, at the target rate, with the same
workload, and set the measured figures beside the predicted ones.

The prediction compared is the model's for exactly the requests the validation run sends (the load
generator is seeded: the same arrival times and lengths), so the error measures the model, not the
luck of two different draws. Only what `mesh serve` can start on this machine is run: one gateway
with W expert workers, W dividing the experts evenly, no redundant copies, on the measured (cpu)
hardware.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from mesh.plan.perfmodel import Deployment
from mesh.plan.planner import predict_requests
from mesh.plan.search import Slo
from mesh.plan.simulate import SimRequest
from mesh.plan.workload import arrival_offsets, cached_tokens, synthetic
from router_service.loadtest.generator import RunSpec
from router_service.loadtest.localserve import LocalServer
from router_service.loadtest.profiler import Workload
from router_service.loadtest.runner import LoadTest, run_loadtest

# (label, figure, percentile key): what the validation table compares
ROWS = (("TTFT p50 (ms)", "ttft_ms", "p50"), ("TTFT p90 (ms)", "ttft_ms", "p90"),
        ("TPOT p50 (ms)", "tpot_ms", "p50"), ("TPOT p90 (ms)", "tpot_ms", "p90"),
        ("throughput (req/s)", "throughput_rps", None), ("output tok/s", "output_tokens_per_s", None),
        ("goodput (req/s)", "goodput_rps", None))


def why_not(result: dict, num_experts: int) -> str | None:
    """Why the recommended deployment cannot run on this machine (None: it can)."""
    if not result.get("feasible"):
        return "there is no recommended deployment"
    if result.get("hardware") != "cpu":
        return f"the plan is for {result.get('hardware')} devices; only cpu plans run on this machine"
    if result["gateways"] != 1:
        return (f"it has {result['gateways']} gateways: `mesh serve` runs one gateway per process, and replicas "
                "sharing this machine's cores would not measure separate machines")
    if result["redundant_experts"]:
        return "it has redundant experts, which `mesh serve` cannot place"
    w = result["expert_workers"]
    if w and num_experts % w:
        return f"{w} workers do not split the {num_experts} experts evenly, as `mesh serve` needs"
    return None


def the_requests(work: Workload, rate: float, duration: float, seed: int,
                 block_size: int = 16) -> list[SimRequest]:
    """What a one-level load test at `rate` with this seed sends: the runner's arrivals and lengths."""
    offsets = arrival_offsets("poisson", rate, duration, seed)
    if work.trace is not None:
        specs = list(itertools.islice(itertools.cycle(work.trace), len(offsets)))
        cached = cached_tokens(specs, block_size)
        return [SimRequest(t, s.prompt_tokens, s.output_tokens, c) for t, s, c in zip(offsets, specs, cached)]
    gen = synthetic(work.prompt, work.output, seed)  # the runner seeds run 0's lengths with the seed itself
    return [SimRequest(t, (s := next(gen)).prompt_tokens, s.output_tokens) for t in offsets]


def _err(pred, meas) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return 100.0 * (pred / meas - 1.0)


def compare(predicted: dict, measured: dict) -> list[dict]:
    rows = []
    for label, key, q in ROWS:
        p = predicted[key][q] if q else predicted[key]
        m = (measured.get(key) or {}).get(q) if q else measured.get(key)
        iv = (predicted.get("interval") or {}).get(f"{key}.{q}" if q else key)
        rows.append({"figure": label, "key": f"{key}.{q}" if q else key, "predicted": p, "measured": m,
                     "error_pct": _err(p, m), "interval": iv,
                     "in_interval": None if iv is None or m is None else iv[0] <= m <= iv[1]})
    return rows


def validate(result: dict, model, work: Workload, *, duration: float, seed: int, model_dir: str | None,
             serve_args: list[str], env: dict[str, str], slo: Slo, out_dir: Path, progress=sys.stderr) -> dict:
    """Run the plan's deployment at its target rate here; predicted vs measured (see module doc)."""
    dep = Deployment(result["gateways"], result["expert_workers"], result["redundant_experts"])
    rate = result["target_rps"]
    block = getattr(getattr(model, "limits", None), "block_size", 16)
    reqs = the_requests(work, rate, duration, seed, block)
    predicted = predict_requests(model, dep, reqs, slo)
    if progress is not None:
        print(f"validating: mesh serve --workers {dep.expert_workers} at {rate:g} req/s for {duration:g} s "
              f"({len(reqs)} requests) ...", file=progress, flush=True)
    with LocalServer(dep.expert_workers, model_dir, serve_args, env, log=out_dir / "serve.log") as srv:
        lt = LoadTest(target=srv.target, runs=[RunSpec(rate=rate, duration=duration, seed=seed)], out=out_dir,
                      prompt=work.prompt, output=work.output, trace=work.trace, slo_ttft_ms=slo.ttft_ms,
                      slo_tpot_ms=slo.tpot_ms, progress=False, plots=False, seed=seed)
        report = run_loadtest(lt)
    measured = report["runs"][0]
    return {"ran": True, "deployment": dep.as_dict(), "rate": rate, "duration_s": duration, "requests": len(reqs),
            "rows": compare(predicted, measured), "generator_bottleneck": measured["generator_bottleneck"],
            "report": str(out_dir / "report.json")}


def table(v: dict) -> str:
    if not v.get("ran"):
        return f"validation not run: {v['reason']}"
    d = v["deployment"]
    lines = [f"validation: mesh serve --workers {d['expert_workers']} here at {v['rate']:g} req/s for "
             f"{v['duration_s']:g} s ({v['requests']} requests; the prediction is for exactly these requests)",
             f"  {'figure':<20} {'predicted':>10} {'measured':>10} {'error':>8}  interval"]
    for r in v["rows"]:
        f = lambda x: "-" if x is None else f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"  # noqa: E731
        iv = "" if r["interval"] is None else (f"[{f(r['interval'][0])}, {f(r['interval'][1])}]"
                                               + ("" if r["in_interval"] else " (measured outside)"))
        e = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        lines.append(f"  {r['figure']:<20} {f(r['predicted']):>10} {f(r['measured']):>10} {e:>8}  {iv}")
    if v.get("generator_bottleneck"):
        lines.append("  the load generator could not keep its schedule: the measured figures partly measure it")
    return "\n".join(lines)
