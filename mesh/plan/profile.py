"""Measured profiles -> a fitted `MeasuredModel` (mesh.plan.measured).

A profile is the `report.json` of `mesh loadtest`, or the file `mesh profile` writes
({"schema": "mesh.profile/1", "shapes": [report, ...]}: one report per deployment shape). What the
fit reads of a report, per load level (`runs[i].profile`):
- server_intervals: the server's own counters between polls (columns in `server_columns`: steps,
  sequences scheduled, decode/prefill tokens, context tokens, engine-thread busy seconds, forward
  seconds, seconds in the experts' dispatch/combine, the busiest worker's compute seconds);
- requests [[sent_s, prompt_tokens, cached_tokens, output_tokens, ttft_ms, e2e_ms], ...]: the level's
  completed requests, replayed through the simulator to calibrate the time each request spends
  outside the engine thread (RPC, the server's event loop) from TTFT, and to check the fit (`replay`).
At the top: `model` (GetModelInfo: experts, top-k, hidden size, workers), `server` (scheduler limits,
KV blocks, the last GetServerStats with the thread counts), `expert_load`, `client.cores`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from mesh.plan.fit import fit
from mesh.plan.hardware import ModelShape
from mesh.plan.measured import MeasuredModel, ShapeFit, mesh_worker_threads
from mesh.plan.metrics import summarize
from mesh.plan.perfmodel import Deployment, Imbalance
from mesh.plan.simulate import Limits, SimRequest, simulate

PROFILE_SCHEMA = "mesh.profile/1"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e.msg} (line {e.lineno})") from None


def _check_report(rep, where: str) -> dict:
    if not isinstance(rep, dict) or not isinstance(rep.get("runs"), list) or not rep["runs"]:
        raise ValueError(f"{where} is not a `mesh loadtest` report (it has no runs)")
    if not any(r.get("profile", {}).get("server_intervals") for r in rep["runs"]):
        raise ValueError(f"{where} has no server step counters (runs[].profile.server_intervals): it was "
                         "written by an older mesh loadtest, or the server predates GetServerStats' step "
                         "counters; profile again")
    return rep


def load_profile(path: str | Path) -> list[dict]:
    """The shapes in a profile file or a report.json (one report per shape); ValueError naming the file
    when it is neither."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and data.get("schema") == PROFILE_SCHEMA:
        shapes = data.get("shapes")
        if not isinstance(shapes, list) or not shapes:
            raise ValueError(f"{path} is a mesh profile without shapes")
        return [_check_report(rep, f"{path} (shape {i + 1})") for i, rep in enumerate(shapes)]
    if isinstance(data, dict) and data.get("bench") or (isinstance(data, list)):
        raise ValueError(f"{path} is not a `mesh loadtest` report or `mesh profile` file (GPU profiles from "
                         "bench/gpu_serving.py go to --gpu-profile)")
    return [_check_report(data, str(path))]


def _limits(server: dict) -> Limits:
    return Limits(int(server.get("max_num_seqs") or 256), int(server.get("max_num_batched_tokens") or 2048),
                  int(server["num_kv_blocks"]) if server.get("num_kv_blocks") else None,
                  int(server.get("block_size") or 16))


def model_shape(report: dict) -> ModelShape | None:
    cfg = report.get("model_config")
    if not cfg:
        return None
    from mesh.config import ConfigError, ModelConfig
    try:
        return ModelShape.from_config(ModelConfig.from_hf(cfg), name=str(report.get("model", {}).get("model", "profiled")))
    except (ConfigError, KeyError, TypeError):
        return None


def workers_of(report: dict) -> int:
    return int(report.get("model", {}).get("num_expert_workers", 0) or 0)


def run_requests(run: dict) -> list[SimRequest]:
    reqs = run.get("profile", {}).get("requests") or []
    return sorted((SimRequest(float(r[0]), int(r[1]), int(r[3]), int(r[2])) for r in reqs), key=lambda r: r.arrival)


def lengths(reports: Sequence[dict]) -> list[tuple[int, int, int]]:
    """(prompt, cached, output) of every profiled request."""
    return [(int(r[1]), int(r[2]), int(r[3])) for rep in reports for run in rep["runs"]
            for r in run.get("profile", {}).get("requests") or []]


def queue_grows(run: dict) -> bool:
    """The level overloaded the server: the last quarter of its arrivals waited clearly longer for
    the first token than the second quarter (the same test the planner's search applies)."""
    reqs = sorted(run.get("profile", {}).get("requests") or [])
    n = len(reqs)
    if n < 16:
        return False
    q2 = [r[4] for r in reqs[n // 4: n // 2]]
    q4 = [r[4] for r in reqs[3 * n // 4:]]
    return sum(q4) / len(q4) > 1.5 * sum(q2) / len(q2) + 50.0


def _intervals(report: dict) -> list[dict]:
    out = []
    for run in report["runs"]:
        prof = run.get("profile", {})
        cols = prof.get("server_columns") or []
        for row in prof.get("server_intervals") or []:
            iv = dict(zip(cols, row))
            if iv.get("steps", 0) >= 2 and iv.get("busy_s", 0) > 0:
                out.append(iv)
    return out


def _steps(report: dict) -> list[dict]:
    """The server's records of single steps (complete ones: their pass closed), as rows like an
    interval's with steps = 1."""
    out = []
    for run in report["runs"]:
        prof = run.get("profile", {})
        cols = prof.get("server_step_columns") or []
        for row in prof.get("server_steps") or []:
            st = dict(zip(cols, row))
            if st.get("busy_s", 0) > 0:
                st["steps"] = 1
                out.append(st)
    return out


# No trimming of slow steps: a step that another thread or process held up is part of what requests
# see (TPOT is a mean over steps); a least-squares law is the conditional mean, which is what the
# simulator needs.
TRIM = None


def fit_shape(report: dict, top_k: int, imbalance: Imbalance) -> ShapeFit:
    """One shape's parts, fitted to its single steps where the report has them (else to intervals)."""
    W = workers_of(report)
    steps = _steps(report)
    ivs = steps if len(steps) >= 50 else _intervals(report)
    trim = TRIM if ivs is steps else None
    where = f"--workers {W}"
    host = fit(("steps", "seqs"), [[iv["steps"], iv["seqs"]] for iv in ivs],
               [max(iv["busy_s"] - iv["forward_s"], 0.0) for iv in ivs], what=f"the host-time fit ({where})", trim=trim)
    dense = fit(("steps", "decode", "prefill", "ctx"), [[iv["steps"], iv["decode"], iv["prefill"], iv["ctx"]] for iv in ivs],
                [max(iv["forward_s"] - iv["expert_s"], 0.0) for iv in ivs], what=f"the dense-compute fit ({where})",
                trim=trim)
    rows = [(iv["decode"] + iv["prefill"]) * top_k for iv in ivs]
    if W == 0:
        experts = fit(("steps", "rows"), [[iv["steps"], r] for iv, r in zip(ivs, rows)],
                      [iv["expert_s"] for iv in ivs], what=f"the expert-compute fit ({where})", trim=trim)
        transport = None
    else:
        static = imbalance.static(W, 0)
        experts = fit(("steps", "rows"), [[iv["steps"], r * static / W] for iv, r in zip(ivs, rows)],
                      [iv["worker_max_s"] for iv in ivs], what=f"the expert-worker compute fit ({where})", trim=trim)
        transport = fit(("steps", "rows"), [[iv["steps"], r] for iv, r in zip(ivs, rows)],
                        [max(iv["expert_s"] - iv["worker_max_s"], 0.0) for iv in ivs],
                        what=f"the transport fit ({where})", trim=trim)
    stats = (report.get("server") or {}).get("stats") or {}
    runs = report["runs"]
    stretch = {}
    if all("busy_cpu_s" in iv for iv in ivs):
        spans = {"host": (lambda iv: iv["busy_s"] - iv["forward_s"], lambda iv: iv["busy_cpu_s"] - iv["forward_cpu_s"]),
                 "dense": (lambda iv: iv["forward_s"] - iv["expert_s"], lambda iv: iv["forward_cpu_s"] - iv["expert_cpu_s"])}
        if W == 0:
            spans["experts"] = (lambda iv: iv["expert_s"], lambda iv: iv["expert_cpu_s"])
        for part, (wall, cpu) in spans.items():
            w, c = sum(map(wall, ivs)), sum(map(cpu, ivs))
            stretch[part] = max(w / c, 1.0) if c > 0 else 1.0
    hop = [r["profile"]["hops"] for r in runs if (r.get("profile") or {}).get("hops")]
    hops = {k: statistics.fmean(h[k] for h in hop) for k in ("arrival_ms", "delivery_ms")} if hop else {}
    return ShapeFit(W, host, dense, experts, transport, int(stats.get("compute_threads") or 1),
                    int(stats.get("worker_threads") or 0), [r.get("rate") for r in runs if r.get("rate")],
                    max((r.get("throughput_rps") or 0.0) for r in runs),
                    max(iv["seqs"] / iv["steps"] for iv in ivs), stretch=stretch,
                    source="steps" if ivs is steps else "intervals", samples=len(ivs), hops=hops,
                    rtt_ms=float((report.get("server") or {}).get("rtt_ms") or 0.0))


def build_model(reports: Sequence[dict], calibrate: bool = True) -> MeasuredModel:
    """Fit every profiled shape (one report per shape: a second report of a shape already seen adds
    its levels to the first's), then calibrate each shape's latency and replay its levels."""
    if not reports:
        raise ValueError("give at least one --profile")
    by_w: dict[int, dict] = {}
    for rep in reports:
        w = workers_of(rep)
        if w in by_w:
            by_w[w] = {**by_w[w], "runs": by_w[w]["runs"] + rep["runs"]}
        else:
            by_w[w] = rep
    first = by_w[min(by_w)]
    info = first.get("model", {})
    shape = model_shape(first)
    moe_layers = int(first.get("moe_layers") or (shape.moe_layers if shape else 0) or info.get("num_layers") or 1)
    top_k = int(info.get("top_k") or 1)
    load = next((r.get("expert_load") for r in by_w.values() if r.get("expert_load")), None)
    imbalance = Imbalance(load)
    shapes = {w: fit_shape(rep, top_k, imbalance) for w, rep in by_w.items()}
    cores = max([int((r.get("client") or {}).get("cores") or 0) for r in by_w.values()] +
                [s.gateway_threads for s in shapes.values()])
    model = MeasuredModel(shapes, _limits(first.get("server", {})), moe_layers, top_k, int(info.get("hidden_size") or 1), int(info.get("num_experts") or 1),
                          act_bytes=2 if str(info.get("dtype", "")).startswith("bfloat") else 4,
                          cores=cores, imbalance=imbalance)
    for w, s in shapes.items():
        if w and not s.worker_threads:
            s.worker_threads = mesh_worker_threads(cores, w)
    if calibrate:
        for w, rep in by_w.items():
            calibrate_shape(model, w, rep)
        model.latency_s = statistics.fmean(s.latency_s for s in shapes.values())
    return model


def replay(model: MeasuredModel, workers: int, run: dict, latency_s: float) -> list[dict]:
    """The level's own arrivals and lengths through the simulator on its profiled shape."""
    return simulate(run_requests(run), model.cost(Deployment(1, workers)), model.limits, latency_s=latency_s)


def calibrate_shape(model: MeasuredModel, workers: int, report: dict) -> None:
    """The time each request spends outside the engine thread (the RPC, the server's event loop and
    threads): per request, measured TTFT minus the simulated one (its level's own arrivals and
    lengths replayed), the median over every request of the levels that kept up, measured by a
    generator that kept its schedule; its spread is half the range of the levels' own medians. Then
    every level is replayed with it (`replay`)."""
    s = model.shapes[workers]
    runs = [r for r in report["runs"] if r.get("profile", {}).get("requests") and (r.get("ttft_ms") or {}).get("p50")]
    steady = [r for r in runs if not queue_grows(r) and not r.get("generator_bottleneck")] or \
        [r for r in runs if not queue_grows(r)] or runs
    pooled, medians = [], []
    for r in steady:
        measured = sorted(r["profile"]["requests"])  # by send time, as the simulator numbers them
        sim = replay(model, workers, r, 0.0)
        gaps = [m[4] / 1e3 - (x["first_token_s"] - x["sent_s"]) for m, x in zip(measured, sim)
                if x.get("first_token_s") is not None]
        if gaps:
            pooled += gaps
            medians.append(statistics.median(gaps))
    if pooled:
        s.latency_s = max(statistics.median(pooled), 0.0)
        s.latency_spread_s = (max(medians) - min(medians)) / 2
    s.replay = []
    for r in runs:
        sim = summarize(replay(model, workers, r, s.latency_s))

        def pair(key: str, q: str = "p50"):
            return {"measured": (r.get(key) or {}).get(q), "simulated": (sim.get(key) or {}).get(q)}
        s.replay.append({"rate": r.get("rate"), "saturated": queue_grows(r), "ttft_ms_p50": pair("ttft_ms"),
                         "tpot_ms_p50": pair("tpot_ms"),
                         "output_tokens_per_s": {"measured": r.get("output_tokens_per_s"),
                                                 "simulated": sim["output_tokens_per_s"]}})
