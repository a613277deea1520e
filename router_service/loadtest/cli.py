"""`mesh loadtest` and `mesh plan`: registered into the `mesh` CLI by mesh.cli (`register`), or run
on their own: `python -m router_service.loadtest loadtest ...`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from mesh.plan.workload import DIST_HELP

HARDWARE = ("cpu", "h100", "h200")


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _fail(flag: str, msg: str) -> SystemExit:
    return SystemExit(f"mesh: error: {flag}: {msg}")


def _floats(flag: str, text: str, allow_inf: bool = False) -> list[float]:
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise _fail(flag, f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise _fail(flag, "give at least one value")
    for v in vals:
        if not (v > 0) or (math.isinf(v) and not allow_inf) or math.isnan(v):
            raise _fail(flag, f"values must be positive numbers, got {v:g}")
    return vals


def _dist(flag: str, text: str):
    from mesh.plan.workload import Dist
    try:
        return Dist.parse(text)
    except ValueError as e:
        raise _fail(flag, str(e)) from None


def _positive(flag: str, v: float | None, allow_zero: bool = False) -> None:
    if v is not None and (v < 0 or (v == 0 and not allow_zero) or math.isnan(v)):
        raise _fail(flag, f"must be {'>= 0' if allow_zero else 'positive'}, got {v:g}")


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "loadtest", help="load-test a running `mesh serve` and write a report (JSON, JSONL, PNG, HTML)",
        formatter_class=fmt,
        description="Send Generate streams to a running `mesh serve` at one or more load levels and report\n"
                    "TTFT, TPOT, ITL, end-to-end latency, throughput and goodput per level.\n\n"
                    "Open loop (--rate): requests arrive on schedule (Poisson by default) whatever the server\n"
                    "does; with --concurrency as well, at most that many are in flight. Closed loop\n"
                    "(--concurrency alone): that many callers, each sending its next request when its last\n"
                    "one ends. Every request asks for exactly its output length (max_tokens, ignore_eos).\n\n"
                    "The generator watches itself: when its send lag or event-loop lag p99 exceeds\n"
                    "--max-lag-ms the run is flagged generator_bottleneck (its figures then partly measure\n"
                    "the generator).\n\n"
                    "OUT gets report.json (the last level's figures at top level, every level under `runs`,\n"
                    "plus the profile `mesh plan --profile` fits), requests.jsonl (one record per request),\n"
                    "latency.png, throughput.png, expert_load.png, timeline.png and report.html.")
    p.add_argument("--target", default=_env("MESH_TARGET"), metavar="HOST:PORT",
                   help="HOST:PORT of a running `mesh serve` (env MESH_TARGET)")
    p.add_argument("--rate", metavar="R[,R2,...]", help="offered load in requests/s; comma-separated for several levels, run in "
                                  "order, e.g. 1,2,4 (open loop)")
    p.add_argument("--concurrency", metavar="C[,C2,...]",
                   help="closed loop without --rate: requests kept in flight (comma-separated for several "
                        "levels); with --rate: the most requests in flight at once")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="seconds of sending per level; in-flight requests then get --drain-timeout "
                        "seconds to finish (default 60; a replayed trace: all of it)")
    p.add_argument("--arrival", choices=["poisson", "constant", "trace"], default=None,
                   help="arrival process of the open loop: poisson (exponential gaps, the default), "
                        "constant (evenly spaced), trace (the --workload file's offset_s, replayed as "
                        "recorded; the default when --workload is given without --rate)")
    w = p.add_argument_group("workload (synthetic lengths, or a trace file)")
    w.add_argument("--prompt-tokens", default="128", metavar="DIST", help=f"prompt length distribution: {DIST_HELP} (default 128)")
    w.add_argument("--output-tokens", default="64", metavar="DIST", help="output length distribution, same forms (default 64)")
    w.add_argument("--workload", metavar="FILE",
                   help="JSONL trace, one request a line: offset_s, prompt_tokens or prompt (text), "
                        "output_tokens, tenant, prefix_id, prefix_tokens (see docs/capacity-planning.md). "
                        "With --rate its requests are sent in order (cycled) at that rate; without, as "
                        "recorded")
    w.add_argument("--tenant", default="", help="x-tenant-id for synthetic requests (default none)")
    s = p.add_argument_group("SLOs (goodput counts the requests meeting all given)")
    s.add_argument("--slo-ttft-ms", type=float, metavar="X", help="time-to-first-token objective, ms")
    s.add_argument("--slo-tpot-ms", type=float, metavar="Y", help="time-per-output-token objective, ms")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the report (created)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompts (default 0)")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds (default none)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to wait for in-flight requests after a level's sending ends; the rest "
                        "are cancelled and counted as CANCELLED (default 60)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default 0)")
    p.add_argument("--channels", type=int, default=4, help="gRPC connections to spread streams over (default 4)")
    p.add_argument("--max-lag-ms", type=float, default=50.0,
                   help="send/event-loop lag p99 above which the generator counts as the bottleneck "
                        "(default 50)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots and the HTML page")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print each level's figures as one JSON object per line")
    p.set_defaults(func=cmd_loadtest)

    q = subparsers.add_parser(
        "plan", help="find the cheapest deployment meeting latency SLOs at a target rate",
        formatter_class=fmt,
        description="Fit a performance model and search deployments (gateways x expert workers x redundant\n"
                    "experts) with a discrete-event simulation of the workload, for the cheapest (fewest\n"
                    "devices) that meets the SLOs at --target-rps.\n\n"
                    "--hardware cpu (the default with --profile): step times fitted from `mesh loadtest`\n"
                    "reports of this machine. --hardware h100|h200: a roofline from published device figures\n"
                    "and the model's shapes (--model, or the profiled model's config), for what cannot be\n"
                    "measured here, e.g. `mesh plan --hardware h100 --model qwen3-coder-next --target-rps 20`.\n\n"
                    "The workload: --workload FILE (a trace; time-scaled to the target rate), else the\n"
                    "profiled requests' lengths, else --prompt-tokens/--output-tokens.")
    q.add_argument("--profile", action="append", default=[], metavar="REPORT",
                   help="report.json of `mesh loadtest` (repeatable: more load levels fit better)")
    q.add_argument("--target-rps", type=float, required=True, metavar="R", help="requests/s to serve")
    q.add_argument("--workload", metavar="FILE", help="JSONL trace (the load test's format)")
    q.add_argument("--prompt-tokens", default=None, metavar="DIST",
                   help=f"prompt lengths when neither --workload nor --profile gives them: {DIST_HELP} "
                        "(default lognormal:1024:0.6)")
    q.add_argument("--output-tokens", default=None, metavar="DIST", help="output lengths, same forms (default lognormal:256:0.5)")
    q.add_argument("--slo-ttft-ms", type=float, metavar="X", help="time-to-first-token objective, ms")
    q.add_argument("--slo-tpot-ms", type=float, metavar="Y", help="time-per-output-token objective, ms")
    q.add_argument("--slo-percentile", type=float, default=90.0,
                   help="percentile the SLOs hold at (default 90)")
    q.add_argument("--hardware", choices=HARDWARE, default=None,
                   help="cpu: this machine, from --profile (the default when given); h100, h200: "
                        "published figures")
    q.add_argument("--model", default=None,
                   help="model shapes for --hardware h100|h200: qwen3-coder-30b-a3b, qwen3-coder-480b-a35b, "
                        "qwen3-coder-next (default: the profiled model)")
    q.add_argument("--max-devices", type=int, default=64, help="largest deployment tried, in devices (default 64)")
    q.add_argument("--max-expert-workers", type=int, default=None, help="largest expert pool tried (default: --max-devices)")
    q.add_argument("--requests", type=int, default=1500,
                   help="simulated requests per candidate (default 1500; more: steadier tails, slower)")
    q.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals (default 0)")
    q.add_argument("--json", action="store_true",
                   help="print gateways, expert_workers, redundant_experts, predicted figures and margin "
                        "as one JSON object")
    q.set_defaults(func=cmd_plan)


# ---- loadtest -------------------------------------------------------------------------------
def loadtest_from_args(args):
    from router_service.loadtest.generator import RunSpec
    from router_service.loadtest.runner import LoadTest
    if not args.target:
        raise _fail("--target", "name the server, HOST:PORT (or set MESH_TARGET)")
    if ":" not in args.target:
        raise _fail("--target", f"expected HOST:PORT, got {args.target!r}")
    _positive("--duration", args.duration)
    _positive("--drain-timeout", args.drain_timeout, allow_zero=True)
    _positive("--timeout", args.timeout)
    _positive("--slo-ttft-ms", args.slo_ttft_ms)
    _positive("--slo-tpot-ms", args.slo_tpot_ms)
    _positive("--max-lag-ms", args.max_lag_ms)
    if args.channels < 1:
        raise _fail("--channels", f"must be at least 1, got {args.channels}")
    trace = None
    if args.workload:
        from mesh.plan.workload import load_trace
        try:
            trace = load_trace(args.workload)
        except ValueError as e:
            raise _fail("--workload", str(e)) from None
    arrival = args.arrival or ("trace" if trace is not None and args.rate is None else "poisson")
    if arrival == "trace" and trace is None:
        raise _fail("--arrival", "trace replays a --workload FILE; give one")
    if arrival == "trace" and args.rate is not None:
        raise _fail("--rate", "--arrival trace replays the file's own arrival times; drop --rate or pick "
                              "--arrival poisson|constant")
    rates = _floats("--rate", args.rate) if args.rate is not None else None
    concs = None
    if args.concurrency is not None:
        concs = [int(c) for c in _floats("--concurrency", args.concurrency)]
        if any(c != v for c, v in zip(concs, _floats("--concurrency", args.concurrency))):
            raise _fail("--concurrency", f"expected whole numbers, got {args.concurrency!r}")
    if rates is None and concs is None and arrival != "trace":
        raise _fail("--rate", "give --rate R[,R2,...] (open loop), --concurrency C (closed loop) or a "
                              "--workload trace to replay")
    if rates and concs and len(concs) > 1:
        raise _fail("--concurrency", "with --rate it caps requests in flight: give one value")
    duration = args.duration
    if duration is None:
        duration = (trace[-1].offset_s or 0.0) - (trace[0].offset_s or 0.0) + 1e-3 if arrival == "trace" else 60.0
    common = dict(duration=duration, seed=args.seed, timeout=args.timeout, drain_timeout=args.drain_timeout,
                  temperature=args.temperature, max_lag_ms=args.max_lag_ms)
    if arrival == "trace":
        runs = [RunSpec(rate=len(trace) / max(trace[-1].offset_s or 1.0, 1e-3), arrival="trace",
                        concurrency=concs[0] if concs else None, **common)]
    elif rates:
        runs = [RunSpec(rate=r, arrival=arrival, concurrency=concs[0] if concs else None, **common) for r in rates]
    else:
        runs = [RunSpec(rate=None, concurrency=c, **common) for c in concs]
    return LoadTest(target=args.target, runs=runs, out=Path(args.out),
                    prompt=_dist("--prompt-tokens", args.prompt_tokens),
                    output=_dist("--output-tokens", args.output_tokens), trace=trace, tenant=args.tenant,
                    slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, channels=args.channels,
                    progress=not args.no_progress, plots=not args.no_plots, seed=args.seed)


def _line(r: dict) -> str:
    load = f"{r['rate']:g} req/s" if r.get("rate") else f"concurrency {r['concurrency']}"
    q = r["requests"]
    f = lambda d, k, n=1: "-" if d.get(k) is None else f"{d[k]:.{n}f}"  # noqa: E731
    flag = "  GENERATOR BOTTLENECK: " + "; ".join(r["generator"]["reasons"]) if r["generator_bottleneck"] else ""
    return (f"{load}: sent {q['sent']} completed {q['completed']} failed {q['failed']} | TTFT p50/p90/p99 "
            f"{f(r['ttft_ms'], 'p50')}/{f(r['ttft_ms'], 'p90')}/{f(r['ttft_ms'], 'p99')} ms | TPOT p50 "
            f"{f(r['tpot_ms'], 'p50', 2)} ms | {r['output_tokens_per_s']:.1f} output tok/s | goodput "
            f"{r['goodput_rps']:.2f} req/s{flag}")


def cmd_loadtest(args) -> int:
    import grpc
    from router_service.loadtest.runner import run_loadtest
    lt = loadtest_from_args(args)
    try:
        report = run_loadtest(lt)
    except grpc.aio.AioRpcError as e:
        raise SystemExit(f"mesh: error: --target {lt.target}: {e.code().name}: {e.details()}") from None
    for r in report["runs"]:
        if args.json:
            print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "timeline")}))
        else:
            print(_line(r))
    print(f"report: {lt.out / 'report.json'}" + (f", {lt.out / 'report.html'}" if lt.plots else ""),
          file=sys.stderr)
    return 0


# ---- plan -----------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    from mesh.plan import planner
    from mesh.plan.profile import load_profile
    from mesh.plan.search import Slo
    from mesh.plan.workload import load_trace
    _positive("--target-rps", args.target_rps)
    _positive("--slo-ttft-ms", args.slo_ttft_ms)
    _positive("--slo-tpot-ms", args.slo_tpot_ms)
    if not 0 < args.slo_percentile <= 100:
        raise _fail("--slo-percentile", f"must be in (0, 100], got {args.slo_percentile:g}")
    if args.max_devices < 1:
        raise _fail("--max-devices", f"must be at least 1, got {args.max_devices}")
    if args.requests < 50:
        raise _fail("--requests", f"simulate at least 50 requests, got {args.requests}")
    reports = []
    for path in args.profile:
        try:
            reports.append(load_profile(path))
        except ValueError as e:
            raise _fail("--profile", str(e)) from None
    hw = args.hardware or ("cpu" if reports else None)
    if hw is None:
        raise _fail("--hardware", "plan from measurements (--profile report.json) or from published figures "
                                  "(--hardware h100|h200 --model NAME)")
    if args.model and hw == "cpu":
        raise _fail("--model", "names published shapes for --hardware h100|h200; --hardware cpu uses the profile")
    try:
        model = planner.cost_model(reports, hw, args.model)
    except ValueError as e:
        raise _fail("--hardware" if "hardware" in str(e) else "--profile" if reports else "--model", str(e)) from None
    block = getattr(model, "limits", None)
    block = block.block_size if block is not None else 16
    if args.workload:
        try:
            specs = load_trace(args.workload)
        except ValueError as e:
            raise _fail("--workload", str(e)) from None
        workload = planner.workload_from_specs(specs, args.requests, args.seed, block)
    elif reports and not (args.prompt_tokens or args.output_tokens):
        workload = planner.Workload.poisson(planner.lengths(reports), args.requests, args.seed)
    else:
        workload = planner.synthetic_workload(_dist("--prompt-tokens", args.prompt_tokens or "lognormal:1024:0.6"),
                                              _dist("--output-tokens", args.output_tokens or "lognormal:256:0.5"),
                                              args.requests, args.seed)
    num_experts = getattr(model, "num_experts", None) or model.shape.experts
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_percentile)
    result = planner.plan(model, workload, args.target_rps, slo, num_experts=num_experts,
                          max_devices=args.max_devices, max_workers=args.max_expert_workers)
    result["hardware"] = hw
    if args.json:
        print(json.dumps(result))
    else:
        print(_plan_text(result))
    return 0 if result["feasible"] else 2


def _plan_text(r: dict) -> str:
    if not r["feasible"]:
        return f"no plan: {r['reason']}"
    p = r["predicted"]
    at = p["at_percentile"]
    q = at["percentile"]
    lines = [f"{r['devices']} device(s) ({r['hardware']}): {r['gateways']} gateway(s), {r['expert_workers']} expert "
             f"worker(s){' (experts inside each gateway)' if not r['expert_workers'] else ''}, "
             f"{r['redundant_experts']} redundant experts",
             f"predicted at {r['target_rps']:g} req/s: TTFT p50 {p['ttft_ms']['p50']:.1f} ms, p{q:g} "
             f"{at['ttft_ms']:.1f} ms; TPOT p50 {p['tpot_ms']['p50'] or 0:.2f} ms, p{q:g} {at['tpot_ms'] or 0:.2f} ms; "
             f"{p['output_tokens_per_s']:.0f} output tok/s"]
    if r.get("max_rps") is not None:
        lines.append(f"sustains up to {r['max_rps']:.2f} req/s within the SLOs (margin {100 * r['margin']:.0f}%)")
    lines.append(f"({r['candidates_evaluated']} deployments simulated)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh", description="moe-mesh load tests and capacity planning")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args) or 0
