"""`mesh loadtest` and `mesh plan`: registered into the `mesh` command by mesh_cli (`register`), or run
on their own: `python -m router_service.loadtest loadtest ...`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from mesh.cli import add_client_security_flags, client_security
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
    add_client_security_flags(p)
    p.set_defaults(func=cmd_loadtest)

    r = subparsers.add_parser(
        "profile", help="sweep deployment shapes over rates up to saturation into one profile for `mesh plan`",
        formatter_class=fmt,
        description="Measure what `mesh plan` fits: for each deployment shape, load levels rising until the\n"
                    "server saturates (requests fail, the queue grows within a level, or the completed rate\n"
                    "falls well short of the offered one); the saturating level is kept.\n\n"
                    "Either sweep a running server (--target), or let this command start `mesh serve\n"
                    "--workers W` on this machine for each W in --workers, one after another, on free\n"
                    "loopback ports (--model, --serve-args and --env go to each).\n\n"
                    "Levels: --rates as given, else --start-rate times --factor^i for at most --max-levels.\n"
                    "Each level sends Poisson arrivals for --duration seconds (then drains).\n\n"
                    "OUT (a JSON file) gets every shape's load-test report; `mesh plan --profile OUT` reads it.\n"
                    "Each shape's report.json and requests.jsonl, and the servers' logs, go beside it in\n"
                    "OUT's name with .d appended.")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--target", default=None, metavar="HOST:PORT", help="sweep this running `mesh serve`")
    where.add_argument("--workers", default=None, metavar="W[,W2,...]",
                       help="start `mesh serve --workers W` here for each W (e.g. 0,1,2) and sweep each")
    r.add_argument("--model", default=None, metavar="DIR",
                   help="with --workers: the model directory to serve (default: mesh serve's built-in model)")
    r.add_argument("--serve-args", default="", metavar="ARGS",
                   help="with --workers: more `mesh serve` flags, one shell-quoted string, e.g. "
                        "\"--dtype float32 --kv-cache-memory 256M\"")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="with --workers: an environment variable for the started servers (repeatable), e.g. "
                        "OMP_NUM_THREADS=1")
    r.add_argument("--rates", default=None, metavar="R[,R2,...]", help="the levels in requests/s, run in order "
                   "(still stopping at the first that saturates)")
    r.add_argument("--start-rate", type=float, default=1.0, metavar="R",
                   help="without --rates: the first level, requests/s (default 1)")
    r.add_argument("--factor", type=float, default=2.0, help="without --rates: each level's rate over the "
                   "previous one's (default 2)")
    r.add_argument("--max-levels", type=int, default=8, help="without --rates: most levels per shape (default 8)")
    r.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds of sending per level (default 20)")
    r.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a level's in-flight requests get to finish after its sending ends (default 60)")
    rw = r.add_argument_group("workload (synthetic lengths, or a trace file)")
    rw.add_argument("--prompt-tokens", default="128", metavar="DIST", help=f"prompt lengths: {DIST_HELP} (default 128)")
    rw.add_argument("--output-tokens", default="64", metavar="DIST", help="output lengths, same forms (default 64)")
    rw.add_argument("--workload", metavar="FILE", help="JSONL trace whose requests are sent in order (cycled) at "
                    "each level's rate (see docs/capacity-planning.md)")
    r.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompts (default 0)")
    r.add_argument("--out", required=True, metavar="FILE", help="the profile file to write (JSON)")
    r.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    r.set_defaults(func=cmd_profile)

    q = subparsers.add_parser(
        "plan", help="find the cheapest deployment meeting latency SLOs at a target rate",
        formatter_class=fmt,
        description="Fit a performance model and search deployments (gateways x expert workers x redundant\n"
                    "experts) with a discrete-event simulation of the workload, for the cheapest (fewest\n"
                    "devices) that keeps up with --target-rps and meets the SLOs given (checked at\n"
                    "--slo-percentile; without SLOs: the cheapest whose queue does not grow, and no margin).\n\n"
                    "--hardware cpu (the default with --profile): a model of this machine's `mesh serve`,\n"
                    "fitted part by part (host, dense, experts, transport) from the server's own step counters\n"
                    "in `mesh profile` files or `mesh loadtest` reports; shapes that were not profiled are\n"
                    "derived from the profiled ones. --hardware h100|h200: a roofline of the model's shapes\n"
                    "(--model, or the profiled model's config) from published device figures, or with\n"
                    "--gpu-profile from step times bench/gpu_serving.py measured on such a GPU.\n\n"
                    "The output says where the prediction extrapolates (a shape or rate beyond the\n"
                    "profiles) and then gives each figure as an interval; it lists every figure that was\n"
                    "assumed rather than measured. --validate runs the recommended deployment here at the\n"
                    "target rate and prints predicted against measured.\n\n"
                    "The workload: --workload FILE (a trace; time-scaled to the target rate), else\n"
                    "--prompt-tokens/--output-tokens, else the profiled requests' lengths.")
    q.add_argument("--profile", action="append", default=[], metavar="FILE",
                   help="a `mesh profile` file or a `mesh loadtest` report.json (repeatable: every shape and "
                        "level given adds to the fit)")
    q.add_argument("--gpu-profile", default=None, metavar="FILE",
                   help="with --hardware h100|h200: the JSON lines bench/gpu_serving.py printed on that GPU "
                        "(decode/prefill step times, copy rate, a mixed run) to plan from measured step times")
    q.add_argument("--target-rps", type=float, required=True, metavar="R", help="requests/s to serve")
    q.add_argument("--workload", metavar="FILE", help="JSONL trace (the load test's format)")
    q.add_argument("--prompt-tokens", default=None, metavar="DIST",
                   help=f"prompt lengths when neither --workload nor --profile gives them: {DIST_HELP} "
                        "(default lognormal:1024:0.6)")
    q.add_argument("--output-tokens", default=None, metavar="DIST", help="output lengths, same forms (default lognormal:256:0.5)")
    q.add_argument("--slo-ttft-ms", type=float, metavar="X", help="time-to-first-token objective, ms")
    q.add_argument("--slo-tpot-ms", type=float, metavar="Y", help="time-per-output-token objective, ms")
    q.add_argument("--slo-percentile", type=float, default=90.0,
                   help="percentile the SLOs are checked at (default 90)")
    q.add_argument("--hardware", choices=HARDWARE, default=None,
                   help="cpu: this machine, from --profile (the default when given); h100, h200: "
                        "published figures, or --gpu-profile")
    q.add_argument("--model", default=None,
                   help="model shapes for --hardware h100|h200: qwen3-coder-30b-a3b, qwen3-coder-480b-a35b, "
                        "qwen3-coder-next (default: the --gpu-profile's or the profiled model)")
    q.add_argument("--max-devices", type=int, default=64, help="largest deployment tried, in devices (default 64)")
    q.add_argument("--max-expert-workers", type=int, default=None, help="largest expert pool tried (default: --max-devices)")
    q.add_argument("--expert-workers", default=None, metavar="W[,W2,...]",
                   help="consider only these expert-pool sizes (0: experts inside the gateways), e.g. 2 to plan "
                        "for a deployment that keeps its experts in a pool (default: every size)")
    q.add_argument("--requests", type=int, default=1500,
                   help="simulated requests per candidate (default 1500; more: steadier tails, slower)")
    q.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals and of --validate's run "
                   "(default 0)")
    v = q.add_argument_group("validation (--hardware cpu)")
    v.add_argument("--validate", action="store_true",
                   help="start the recommended deployment here (`mesh serve`, one gateway), load it at the target "
                        "rate with the same workload and print predicted against measured TTFT/TPOT p50/p90, "
                        "throughput and goodput, with each error")
    v.add_argument("--validate-duration", type=float, default=30.0, metavar="S",
                   help="seconds of sending in the validation run (default 30)")
    v.add_argument("--serve-model", default=None, metavar="DIR",
                   help="the model directory the validation serves (default: the profile's)")
    v.add_argument("--serve-args", default=None, metavar="ARGS",
                   help="`mesh serve` flags for the validation, one shell-quoted string (default: the ones the "
                        "profile's servers were started with by `mesh profile`)")
    v.add_argument("--env", action="append", default=None, metavar="KEY=VALUE",
                   help="environment for the validation's server (repeatable; default: the profile's)")
    v.add_argument("--validate-out", default=None, metavar="DIR",
                   help="where the validation's report and server log go (default: a new temporary directory)")
    q.add_argument("--json", action="store_true",
                   help="print the plan (gateways, expert_workers, redundant_experts, predicted figures with "
                        "their interval, margin, max_rps, extrapolation, assumptions, validation) as one JSON object")
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
                    progress=not args.no_progress, plots=not args.no_plots, seed=args.seed,
                    security=client_security(args))


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
    from router_service.tls import TlsError
    try:
        report = run_loadtest(lt)
    except grpc.aio.AioRpcError as e:
        raise SystemExit(f"mesh: error: --target {lt.target}: {e.code().name}: {e.details()}") from None
    except TlsError as e:
        raise SystemExit(f"mesh: error: {e}") from None
    for r in report["runs"]:
        if args.json:
            print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "timeline")}))
        else:
            print(_line(r))
    print(f"report: {lt.out / 'report.json'}" + (f", {lt.out / 'report.html'}" if lt.plots else ""),
          file=sys.stderr)
    return 0


# ---- profile --------------------------------------------------------------------------------
def _int_list(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _fail(flag, f"expected comma-separated whole numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise _fail(flag, f"expected whole numbers >= 0, got {text!r}")
    return vals


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise _fail("--env", f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _workload(args):
    from router_service.loadtest.profiler import Workload
    trace = None
    if getattr(args, "workload", None):
        from mesh.plan.workload import load_trace
        try:
            trace = load_trace(args.workload)
        except ValueError as e:
            raise _fail("--workload", str(e)) from None
    return Workload(_dist("--prompt-tokens", args.prompt_tokens), _dist("--output-tokens", args.output_tokens), trace)


def cmd_profile(args) -> int:
    import shlex
    from router_service.loadtest.localserve import ServeError
    from router_service.loadtest.profiler import Sweep, profile_shapes, profile_target, summary_line, write_profile
    if args.target is None and args.workers is None:
        raise _fail("--workers", "sweep a running server (--target HOST:PORT) or start shapes here (--workers 0,1,2)")
    if args.target is not None and ":" not in args.target:
        raise _fail("--target", f"expected HOST:PORT, got {args.target!r}")
    if args.target is not None and (args.model or args.serve_args or args.env):
        raise _fail("--target", "--model, --serve-args and --env configure servers started with --workers")
    _positive("--duration", args.duration)
    _positive("--start-rate", args.start_rate)
    _positive("--drain-timeout", args.drain_timeout, allow_zero=True)
    if not args.factor > 1:
        raise _fail("--factor", f"must be above 1, got {args.factor:g}")
    if args.max_levels < 1:
        raise _fail("--max-levels", f"must be at least 1, got {args.max_levels}")
    rates = _floats("--rates", args.rates) if args.rates is not None else None
    try:
        serve_args = shlex.split(args.serve_args)
    except ValueError as e:
        raise _fail("--serve-args", str(e)) from None
    for flag in ("--workers", "--port", "--host", "--model"):
        if flag in serve_args:
            raise _fail("--serve-args", f"{flag} is set by mesh profile itself")
    env = _env_pairs(args.env)
    sweep = Sweep(args.duration, rates, args.start_rate, args.factor, args.max_levels, args.seed, args.drain_timeout)
    work = _workload(args)
    out = Path(args.out)
    side = out.with_name(out.name + ".d")
    progress = None if args.no_progress else sys.stderr
    try:
        if args.target is not None:
            import grpc
            try:
                reports = [profile_target(args.target, sweep, work, side, args.target, progress)]
            except grpc.aio.AioRpcError as e:
                raise SystemExit(f"mesh: error: --target {args.target}: {e.code().name}: {e.details()}") from None
        else:
            reports = profile_shapes(_int_list("--workers", args.workers), sweep, work, side, model=args.model,
                                     serve_args=serve_args, env=env, progress=progress)
    except ServeError as e:
        raise SystemExit(f"mesh: error: --workers: {e}") from None
    write_profile(out, reports)
    for rep in reports:
        print(summary_line(rep))
    print(f"profile: {out}", file=sys.stderr)
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
    _positive("--validate-duration", args.validate_duration)
    if not 0 < args.slo_percentile <= 100:
        raise _fail("--slo-percentile", f"must be in (0, 100], got {args.slo_percentile:g}")
    if args.max_devices < 1:
        raise _fail("--max-devices", f"must be at least 1, got {args.max_devices}")
    if args.requests < 50:
        raise _fail("--requests", f"simulate at least 50 requests, got {args.requests}")
    pools = _int_list("--expert-workers", args.expert_workers) if args.expert_workers is not None else None
    reports = []
    for path in args.profile:
        try:
            reports.extend(load_profile(path))
        except ValueError as e:
            raise _fail("--profile", str(e)) from None
    gpu = None
    if args.gpu_profile:
        from mesh.plan.gpu import load_gpu_profile
        try:
            gpu = load_gpu_profile(args.gpu_profile)
        except ValueError as e:
            raise _fail("--gpu-profile", str(e)) from None
    hw = args.hardware or ("cpu" if reports else None)
    if hw is None:
        raise _fail("--hardware", "plan from measurements (--profile FILE) or for a GPU (--hardware h100|h200 "
                                  "--model NAME, optionally --gpu-profile FILE)")
    if args.model and hw == "cpu":
        raise _fail("--model", "names published shapes for --hardware h100|h200; --hardware cpu uses the profile")
    if gpu is not None and hw == "cpu":
        raise _fail("--gpu-profile", "is for --hardware h100|h200 (the cpu model comes from --profile)")
    if args.validate and hw != "cpu":
        raise _fail("--validate", f"runs the plan on this machine: it needs --hardware cpu, not {hw}")
    try:
        model = planner.cost_model(reports, hw, args.model, gpu)
    except ValueError as e:
        msg = str(e)
        flag = ("--gpu-profile" if "--gpu-profile" in msg else "--hardware" if "hardware" in msg
                else "--profile" if reports else "--model")
        raise _fail(flag, msg) from None
    limits = getattr(model, "limits", None)
    block = limits.block_size if limits is not None else 16
    specs = None
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
    print(f"planning for {args.target_rps:g} req/s ({hw}) ...", file=sys.stderr, flush=True)
    result = planner.plan(model, workload, args.target_rps, slo, num_experts=num_experts,
                          max_devices=args.max_devices, max_workers=args.max_expert_workers, pool_sizes=pools)
    result["hardware"] = hw
    if args.validate:
        result["validation"] = _validate(args, result, model, reports, specs, slo, num_experts)
    if args.json:
        print(json.dumps(result))
    else:
        print(_plan_text(result))
        if "validation" in result:
            from router_service.loadtest.validate import table
            print(table(result["validation"]))
    return 0 if result["feasible"] else 2


def _validate(args, result: dict, model, reports: list[dict], specs, slo, num_experts: int) -> dict:
    import shlex
    import tempfile
    from router_service.loadtest.localserve import ServeError
    from router_service.loadtest.profiler import Workload
    from router_service.loadtest.validate import validate, why_not
    reason = why_not(result, num_experts)
    if reason:
        return {"ran": False, "reason": reason}
    launch = next((r["launch"] for r in reports if r.get("launch")), {})
    model_dir = args.serve_model or launch.get("model") or (reports[0].get("model") or {}).get("model")
    if model_dir and not (Path(model_dir) / "config.json").is_file():
        raise _fail("--serve-model", f"{model_dir} has no config.json on this machine: name the profiled model's "
                                     "directory")
    try:
        serve_args = shlex.split(args.serve_args) if args.serve_args is not None else list(launch.get("serve_args") or [])
    except ValueError as e:
        raise _fail("--serve-args", str(e)) from None
    env = _env_pairs(args.env) if args.env is not None else dict(launch.get("env") or {})
    if specs is not None:
        work = Workload(trace=specs)
    elif args.prompt_tokens or args.output_tokens:
        work = Workload(_dist("--prompt-tokens", args.prompt_tokens or "lognormal:1024:0.6"),
                        _dist("--output-tokens", args.output_tokens or "lognormal:256:0.5"))
    else:
        w = (reports[0].get("workload") or {})
        if "prompt_tokens" not in w:
            raise _fail("--validate", "the profile was taken with a trace: give it again with --workload FILE")
        work = Workload(_dist("--profile", w["prompt_tokens"]), _dist("--profile", w["output_tokens"]))
    out = Path(args.validate_out) if args.validate_out else Path(tempfile.mkdtemp(prefix="mesh-plan-validate-"))
    try:
        return validate(result, model, work, duration=args.validate_duration, seed=args.seed, model_dir=model_dir,
                        serve_args=serve_args, env=env, slo=slo, out_dir=out)
    except ServeError as e:
        raise SystemExit(f"mesh: error: --validate: {e}") from None


def _fmt(x, unit: str = "", digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def _with_interval(r: dict, key: str, value, unit: str, digits: int = 1) -> str:
    iv = (r.get("interval") or {}).get(key)
    text = _fmt(value, unit, digits)
    if iv is not None and r.get("extrapolation"):
        text += f" [{_fmt(iv[0], '', digits)}, {_fmt(iv[1], '', digits)}]"
    return text


def _plan_text(r: dict) -> str:
    if not r["feasible"]:
        return f"no plan: {r['reason']}"
    p = r["predicted"]
    at = p["at_percentile"]
    q = at["percentile"]
    lines = [f"{r['devices']} device(s) ({r['hardware']}): {r['gateways']} gateway(s), {r['expert_workers']} expert "
             f"worker(s){' (experts inside each gateway)' if not r['expert_workers'] else ''}, "
             f"{r['redundant_experts']} redundant experts",
             f"predicted at {r['target_rps']:g} req/s: TTFT p50 {_with_interval(r, 'ttft_ms.p50', p['ttft_ms']['p50'], ' ms')}, "
             f"p90 {_with_interval(r, 'ttft_ms.p90', p['ttft_ms']['p90'], ' ms')}; "
             f"TPOT p50 {_with_interval(r, 'tpot_ms.p50', p['tpot_ms']['p50'], ' ms', 2)}, "
             f"p90 {_with_interval(r, 'tpot_ms.p90', p['tpot_ms']['p90'], ' ms', 2)}; "
             f"{_with_interval(r, 'output_tokens_per_s', p['output_tokens_per_s'], ' output tok/s', 0)}; "
             f"goodput {_with_interval(r, 'goodput_rps', p['goodput_rps'], ' req/s', 2)}"]
    slo = r["slo"]
    if r.get("slo_given"):
        objs = [f"TTFT <= {slo['ttft_ms']:g} ms (p{q:g}: {_fmt(at['ttft_ms'], ' ms')})" if slo["ttft_ms"] is not None else "",
                f"TPOT <= {slo['tpot_ms']:g} ms (p{q:g}: {_fmt(at['tpot_ms'], ' ms', 2)})" if slo["tpot_ms"] is not None else ""]
        lines.append(f"SLOs checked at p{q:g}: {'; '.join(o for o in objs if o)}: met, margin {100 * r['margin']:.0f}%")
    else:
        lines.append("no SLOs given: the deployment only has to keep up (its queue must not grow); no margin; "
                     "goodput counts every completed request")
    if r.get("max_rps") is not None:
        lines.append(f"sustains up to {r['max_rps']:.2f} req/s ({r['max_rps_basis']})"
                     + (f"; extrapolated: {r['max_rps_extrapolated']}" if r.get("max_rps_extrapolated") else ""))
    m = r.get("model") or {}
    if m.get("kind") == "gpu-profile":
        law, fits = m["law"], m.get("decode_fit") or []
        worst = max((abs(f["fitted_ms"] / f["measured_ms"] - 1) for f in fits), default=0.0)
        mixed = (m.get("checks") or {}).get("mixed")
        lines.append(f"step times measured on {m['gpu']} ({m['profile']}, {m['profiled_model']}): decode at "
                     f"{len(fits)} batch sizes, law {law['overhead_ms']:.2f} ms + {law['bytes_per_copy_byte']:.2f} x "
                     f"bytes / {law['copy_tb_s']:.2f} TB/s + {law['us_per_decode_token']:.1f} us per decode token, "
                     f"within {100 * worst:.0f}% of each"
                     + (f"; mixed run {mixed['measured_output_tok_s']:.0f} output tok/s measured, "
                        f"{mixed['simulated_output_tok_s']:.0f} simulated" if mixed else ""))
    if r.get("extrapolation"):
        lines.append("EXTRAPOLATED beyond the profiles (figures in brackets: the prediction interval):")
        lines += [f"  - {x}" for x in r["extrapolation"]]
    if r.get("assumptions"):
        lines.append("assumed, not measured:")
        for a in r["assumptions"]:
            spread = f" (+-{100 * a['spread']:.0f}% in the interval)" if a.get("spread") else ""
            lines.append(f"  - {a['what']}: {a.get('assumed') or a.get('measured')}{spread}")
    lines.append(f"({r['candidates_evaluated']} deployments simulated)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh", description="moe-mesh load tests and capacity planning")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args) or 0
