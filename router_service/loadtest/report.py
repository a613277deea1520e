"""The load test's report: per-run figures (mesh.plan.metrics), the planner's profile, and the files.

OUT/report.json   top level: the last run's figures (requests.sent/completed/failed, ttft_ms,
                  tpot_ms, itl_ms, e2e_ms as {mean,p50,p90,p99,count}, output_tokens_per_s,
                  goodput_rps, cached_token_share, errors by gRPC code), generator_bottleneck, and
                  `runs`: the same figures per load level, each with its `profile` (what
                  `mesh plan --profile` fits) and `timeline` (server queues over time); plus
                  `model` (GetModelInfo), `server`, `expert_load` [moe_layers][num_experts]
                  (tokens routed during the test).
OUT/requests.jsonl one record per request (mesh.plan.metrics' record format, plus `run`, `i`,
                  `tenant`, `prefix_id`, `intended_s`, `error`, `finish_reason`).
OUT/*.png, OUT/report.html  see plots.py.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Sequence

from mesh.plan.metrics import summarize

SCHEMA = "mesh.loadtest/1"
TOP_LEVEL = ("requests", "window_s", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "throughput_rps",
             "output_tokens_per_s", "input_tokens_per_s", "goodput_rps", "slo", "cached_token_share",
             "tokens", "errors", "generator_bottleneck", "rate", "concurrency")


def _busy_union(records: Sequence[dict]) -> list[tuple[float, float]]:
    spans = sorted((r["sent_s"], r["end_s"]) for r in records if r.get("end_s") is not None)
    out: list[list[float]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(union: list[tuple[float, float]], t0: float, t1: float) -> float:
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in union if b > t0 and a < t1)


def token_events(records: Sequence[dict]) -> list[tuple[float, int, int, float]]:
    """(time, decode tokens, prefill tokens, ctx units) for every token-carrying response."""
    ev = []
    for r in records:
        first = r.get("first_token_s")
        if first is None:
            continue
        p, c = r["prompt_tokens"], r.get("cached_tokens", 0)
        n = max(p - c, 0)
        ev.append((first, 0, n, n * c + n * (n + 1) / 2))
        t = first
        for j, gap in enumerate(r.get("itl_ms") or (), 1):
            t += gap / 1000.0
            ev.append((t, 1, 0, float(p + j)))
    ev.sort()
    return ev


def profile_intervals(records: Sequence[dict], polls: Sequence[dict], window: float = 0.5) -> list[list[float]]:
    """[t0, t1, busy_s, steps, decode, prefill, ctx] per window between server polls (see
    mesh.plan.profile)."""
    if len(polls) < 2:
        return []
    union = _busy_union(records)
    ev = token_events(records)
    times = [e[0] for e in ev]
    bounds = [polls[0]]
    for p in polls[1:]:
        if p["t"] - bounds[-1]["t"] >= window:
            bounds.append(p)
    out = []
    for a, b in zip(bounds, bounds[1:]):
        t0, t1 = a["t"], b["t"]
        steps = b["steps"] - a["steps"]
        lo, hi = bisect.bisect_left(times, t0), bisect.bisect_left(times, t1)
        dec = sum(e[1] for e in ev[lo:hi])
        pre = sum(e[2] for e in ev[lo:hi])
        ctx = sum(e[3] for e in ev[lo:hi])
        out.append([round(t0, 4), round(t1, 4), round(_overlap(union, t0, t1), 5), steps, dec, pre, ctx])
    return out


# columns of runs[].profile.server_intervals (mesh.plan.profile reads them by name)
SERVER_COLUMNS = ("t0", "t1", "steps", "seqs", "decode", "prefill", "ctx", "busy_s", "forward_s", "expert_s",
                  "worker_max_s", "worker_sum_s", "busy_cpu_s", "forward_cpu_s", "expert_cpu_s")


def server_intervals(polls: Sequence[dict], window: float = 0.2) -> list[list[float]]:
    """The server's own step counters between polls at least `window` seconds apart: one row of
    SERVER_COLUMNS per window in which steps ran (empty for servers without the counters). Short
    windows (the default takes every 0.25 s poll) vary most in their mix of prefill and decode,
    which is what lets the planner's fits tell the costs of tokens, context and steps apart."""
    polls = [p for p in polls if "busy_s" in p]
    if len(polls) < 2:
        return []
    bounds = [polls[0]]
    for p in polls[1:]:
        if p["t"] - bounds[-1]["t"] >= window:
            bounds.append(p)
    out = []
    for a, b in zip(bounds, bounds[1:]):
        steps = b["steps"] - a["steps"]
        if steps <= 0 or b["busy_s"] <= a["busy_s"]:
            continue  # idle, or a server that does not fill in the counters
        wa, wb = a.get("worker_s") or [], b.get("worker_s") or []
        workers = [y - x for x, y in zip(wa, wb)] if len(wa) == len(wb) else []
        out.append([round(a["t"], 4), round(b["t"], 4), steps] +
                   [b[k] - a[k] for k in ("seqs", "decode", "prefill", "ctx")] +
                   [round(b[k] - a[k], 6) for k in ("busy_s", "forward_s", "expert_s")] +
                   [round(max(workers, default=0.0), 6), round(sum(workers), 6)] +
                   [round(b.get(k, 0.0) - a.get(k, 0.0), 6) for k in ("busy_cpu_s", "forward_cpu_s", "expert_cpu_s")])
    return out


# columns of runs[].profile.server_steps: the server's own record of each step (GetServerStats'
# recent_steps), which is what mesh.plan.profile fits
STEP_COLUMNS = ("step", "seqs", "decode", "prefill", "ctx", "busy_s", "forward_s", "expert_s", "worker_max_s",
                "busy_cpu_s", "forward_cpu_s", "expert_cpu_s")


def hops(polls: Sequence[dict]) -> dict | None:
    """The level's mean hops outside the engine thread, from the first to the last poll: a request's
    from its RPC's arrival to the engine's inbox, a step's outputs from the engine to the event loop
    (None from servers without these counters)."""
    ps = [p for p in polls if "arrivals" in p]
    if len(ps) < 2:
        return None
    a, b = ps[0], ps[-1]
    n_arr, n_del = b["arrivals"] - a["arrivals"], b["deliveries"] - a["deliveries"]
    if n_arr <= 0 or n_del <= 0:
        return None
    return {"arrival_ms": (b["arrival_hop_s"] - a["arrival_hop_s"]) / n_arr * 1e3, "arrivals": n_arr,
            "delivery_ms": (b["delivery_hop_s"] - a["delivery_hop_s"]) / n_del * 1e3, "deliveries": n_del}


def run_report(result, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> dict:
    """One load level's figures, generator health, profile and timeline."""
    spec, recs = result.spec, result.records
    rep = {"rate": spec.rate, "concurrency": spec.concurrency, "arrival": spec.arrival if spec.rate else "closed",
           "duration_s": spec.duration}
    rep.update(summarize(recs, slo_ttft_ms, slo_tpot_ms))
    rep["generator_bottleneck"] = result.generator.get("bottleneck", False)
    rep["generator"] = result.generator
    rep["profile"] = {
        "intervals": profile_intervals(recs, result.polls),
        "server_columns": list(SERVER_COLUMNS),
        "server_intervals": server_intervals(result.polls),
        "server_step_columns": list(STEP_COLUMNS),
        "server_steps": [[round(v, 7) if isinstance(v, float) else v for v in rec] for rec in result.steps],
        "requests": [[round(r["sent_s"], 5), r["prompt_tokens"], r.get("cached_tokens", 0), r["output_tokens"],
                      round((r["first_token_s"] - r["sent_s"]) * 1000.0, 3), round((r["end_s"] - r["sent_s"]) * 1000.0, 3)]
                     for r in recs if r.get("code") == "OK" and r.get("first_token_s") is not None],
    }
    rep["timeline"] = [{k: p[k] for k in ("t", "running", "waiting", "in_flight", "kv_blocks_used", "steps")}
                       for p in result.polls]
    rep["profile"]["hops"] = hops(result.polls)
    if result.stats_after is not None:
        rep["server_stats"] = {k: v for k, v in result.stats_after.items() if k != "expert_load"}
    return rep


def load_delta(before: dict | None, after: dict | None) -> list[list[int]]:
    """Tokens routed per (MoE layer, expert) between two GetServerStats snapshots."""
    a = (after or {}).get("expert_load") or []
    b = (before or {}).get("expert_load") or []
    if not b or len(b) != len(a):
        return [list(r) for r in a]
    return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def build_report(meta: dict, runs: list[dict], expert_load: list[list[int]]) -> dict:
    last = runs[-1]
    rep = {"schema": SCHEMA, **{k: last[k] for k in TOP_LEVEL if k in last}}
    rep.update(meta)
    rep["generator_bottleneck"] = any(r["generator_bottleneck"] for r in runs)
    rep["expert_load"] = expert_load
    rep["moe_layers"] = len(expert_load)
    rep["num_experts"] = len(expert_load[0]) if expert_load else 0
    rep["runs"] = runs
    return rep


def write(out: Path, report: dict, records: list[dict], plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "requests.jsonl"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    with paths[1].open("w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    if plots:
        from router_service.loadtest.plots import write_plots
        paths += write_plots(out, report)
    return paths
