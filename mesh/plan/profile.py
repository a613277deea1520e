"""Measured profiles (the `report.json` of `mesh loadtest`) -> a fitted `MeasuredModel`.

What a profile holds, per run (`runs[i].profile`):
- intervals [t0, t1, busy_s, steps, decode_tokens, prefill_tokens, ctx_units]: one per window of
  the run. steps is the server's step counter (GetServerStats) over the window; busy_s the time in
  it during which at least one request was in flight (the engine steps back to back then); the
  token counts are reconstructed from the streamed responses (a prefill is counted when the first
  token arrives; ctx_units = sum over computed tokens of their context length).
- requests [[sent_s, prompt_tokens, cached_tokens, output_tokens, ttft_ms, e2e_ms], ...]: the run's
  completed requests, to replay them in the simulator (calibration), to see how TTFT grows with the
  prompt (the prefill cost) and to resample lengths for planning.
At the top: `server` (scheduler limits, KV blocks, expert workers, the RPC round trip), `model`
(GetModelInfo), `model_config` (config.json when the load test could read it), `expert_load`.

Fit, in three parts:
1. prefill: at the lowest load profiled, TTFT against the uncached prompt length n (least squares
   on 1, n, n(n+1)/2): the slope is the per-token prefill cost (plus attention's quadratic part).
2. per step and per decode token: least squares over every busy interval of every profile, with
   the prefill costs of part 1 subtracted (fit_step_time).
3. calibration: the profiled runs are replayed in the simulator. The time each request spends
   outside the engine (round trip, hops between the server's event loop, thread pool and engine
   thread) is set so the simulated median TTFT matches the measured one, and taken off the busy
   intervals before refitting; then the per-step/decode costs are scaled so the mean TPOT matches
   (what the intervals cannot see, e.g. the CPU the load generator takes beside the server).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from mesh.plan.hardware import ModelShape
from mesh.plan.metrics import summarize
from mesh.plan.perfmodel import Imbalance, MeasuredModel, StepFit, _nnls, fit_step_time
from mesh.plan.simulate import Limits, SimRequest, simulate


def load_profile(path: str | Path) -> dict:
    """Read a report.json; ValueError naming the file when it is not a load-test profile."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ValueError(f"{path} is not a `mesh loadtest` report (it has no runs)")
    if not any(r.get("profile", {}).get("intervals") for r in data["runs"]):
        raise ValueError(f"{path} has no profile intervals (written by an older mesh loadtest?)")
    return data


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


def expert_share(report: dict) -> float:
    """The routed experts' share of the active per-token FLOPs (0.5 when the shapes are unknown)."""
    sh = model_shape(report)
    if sh is None:
        return 0.5
    return sh.expert_params * sh.top_k * sh.moe_layers / max(sh.active_params, 1.0)


def run_requests(run: dict) -> list[SimRequest]:
    reqs = run.get("profile", {}).get("requests") or []
    return sorted((SimRequest(float(r[0]), int(r[1]), int(r[3]), int(r[2])) for r in reqs), key=lambda r: r.arrival)


def lengths(reports: Sequence[dict]) -> list[tuple[int, int, int]]:
    """(prompt, cached, output) of every profiled request."""
    return [(int(r[1]), int(r[2]), int(r[3])) for rep in reports for run in rep["runs"]
            for r in run.get("profile", {}).get("requests") or []]


def build_model(reports: Sequence[dict], calibrate: bool = True) -> MeasuredModel:
    if not reports:
        raise ValueError("give at least one --profile")
    first = reports[0]
    server, info = first.get("server", {}), first.get("model", {})
    workers = {int(rep.get("model", {}).get("num_expert_workers", 0)) for rep in reports}
    rtts = [rep.get("server", {}).get("rtt_ms") for rep in reports if rep.get("server", {}).get("rtt_ms")]
    rtt = statistics.median(rtts) / 1000.0 if rtts else 0.0
    load = first.get("expert_load") or None
    model = MeasuredModel(
        fit=StepFit(0.0, 0.0, 0.0), limits=_limits(server),
        moe_layers=int(first.get("moe_layers") or info.get("num_layers") or 1),
        top_k=int(info.get("top_k") or 1), hidden=int(info.get("hidden_size") or 1),
        num_experts=int(info.get("num_experts") or 1), expert_share=expert_share(first),
        measured_workers=max(workers), latency_s=rtt, imbalance=Imbalance(load))
    # The client sees each request for longer than the engine works on it: the round trip, and
    # the hops between the server's event loop, its thread pool and the engine thread. That time
    # (`latency_s`, calibrated against the measured TTFT) is not engine work: it is taken off the
    # busy intervals before fitting, and the fit and the latency are refined together.
    for _ in range(2 if calibrate else 1):
        intervals = [iv for rep in reports for run in rep["runs"]
                     for iv in busy_intervals(run, max(model.latency_s - rtt / 2, 0.0), rtt / 2)]
        prefill = prefill_fit(reports, model.latency_s)
        model.fit = fit_step_time(intervals, fixed=prefill) if prefill is not None else fit_step_time(intervals)
        if calibrate:
            calibrate_latency(model, reports)
    if len(workers) > 1:
        _fit_dispatch(model, reports)
    if calibrate:
        calibrate_model(model, reports)
    return model


def busy_intervals(run: dict, start_shift: float, end_shift: float) -> list[list[float]]:
    """The run's intervals with busy time recomputed from the requests' spans [sent + start_shift,
    end - end_shift] (profiles without end times keep theirs)."""
    ivs = run.get("profile", {}).get("intervals") or []
    reqs = run.get("profile", {}).get("requests") or []
    if not reqs or len(reqs[0]) < 6:
        return ivs
    spans = sorted((r[0] + start_shift, r[0] + r[5] / 1000.0 - end_shift) for r in reqs)
    union: list[list[float]] = []
    for a, b in spans:
        if b <= a:
            continue
        if union and a <= union[-1][1]:
            union[-1][1] = max(union[-1][1], b)
        else:
            union.append([a, b])
    out = []
    for iv in ivs:
        t0, t1 = iv[0], iv[1]
        busy = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in union if b > t0 and a < t1)
        out.append([t0, t1, busy, *iv[3:]])
    return out


def _runs(reports: Sequence[dict]) -> list[dict]:
    return [run for rep in reports for run in rep["runs"]
            if run.get("profile", {}).get("requests") and (run.get("tpot_ms") or {}).get("mean")
            and (run.get("ttft_ms") or {}).get("p50")]


def calibrate_latency(model: MeasuredModel, reports: Sequence[dict]) -> None:
    """The constant time every request spends outside the engine: the mean over the profiled runs
    of measured minus simulated median TTFT (a constant shifts every response time alike)."""
    runs = _runs(reports)
    if not runs:
        return
    saved, model.latency_s = model.latency_s, 0.0
    gaps = [run["ttft_ms"]["p50"] / 1000.0 - summarize(replay(model, run))["ttft_ms"]["p50"] / 1000.0 for run in runs]
    model.latency_s = max(sum(gaps) / len(gaps), 0.0) if gaps else saved


def prefill_fit(reports: Sequence[dict], latency_s: float) -> tuple[float, float] | None:
    """(prefill_s, ctx_s) from how TTFT grows with the uncached prompt length n, at the lowest load
    profiled: TTFT - latency ~ a + prefill_s * n + ctx_s * n(n+1)/2 (the queueing and the decodes
    sharing the step do not depend on n). None when the prompts are too alike to tell."""
    runs = sorted((run for rep in reports for run in rep["runs"]),
                  key=lambda r: r.get("output_tokens_per_s") or 0.0)
    for run in runs[:1]:
        rows, y = [], []
        for _s, p, c, _o, ttft in (r[:5] for r in run.get("profile", {}).get("requests") or [] if len(r) >= 5):
            n = max(p - c, 1)
            rows.append([1.0, n, n * (n + 1) / 2])
            y.append(ttft / 1000.0 - latency_s)
        if len(rows) < 20:
            return None
        ns = [r[1] for r in rows]
        mean = sum(ns) / len(ns)
        spread = math.sqrt(sum((n - mean) ** 2 for n in ns) / len(ns))
        if spread < 0.2 * mean:
            return None
        cols = rows if max(ns) > 4 * min(ns) else [r[:2] + [0.0] for r in rows]
        coef = _nnls(cols, y)
        if coef[1] <= 0 and coef[2] <= 0:
            return None
        return coef[1], coef[2]
    return None


def calibrate_model(model: MeasuredModel, reports: Sequence[dict], rounds: int = 2) -> None:
    """Replay the profiled runs in the simulator; scale the per-step/decode costs so the mean TPOT
    matches the measurements (geometric mean over runs), then re-set the latency."""
    runs = _runs(reports)
    if not runs:
        return
    for _ in range(rounds):
        logs = []
        for run in runs:
            sim = summarize(replay(model, run))["tpot_ms"]["mean"]
            if sim:
                logs.append(math.log(sim / run["tpot_ms"]["mean"]))
        k = math.exp(-sum(logs) / len(logs)) if logs else 1.0
        k = min(max(k, 0.5), 2.0)  # a larger correction means the fit itself is wrong: do not hide it
        f = model.fit
        model.fit = replace(f, step_s=f.step_s * k, decode_s=f.decode_s * k)
        calibrate_latency(model, reports)


def _fit_dispatch(model: MeasuredModel, reports: Sequence[dict]) -> None:
    """Profiles taken with different expert-worker counts: the per-step constant grows with the
    all-to-alls; per MoE layer two of them, latency lat0 + lat_per_rank * ranks."""
    by_w: dict[int, list] = {}
    for rep in reports:
        w = int(rep.get("model", {}).get("num_expert_workers", 0))
        by_w.setdefault(w, []).extend(iv for run in rep["runs"] for iv in run["profile"]["intervals"])
    if 0 not in by_w:
        return
    base = fit_step_time(by_w[0]).step_s
    pts = [(1 + w, (fit_step_time(iv).step_s - base) / (2 * model.moe_layers)) for w, iv in by_w.items() if w > 0]
    if len(pts) == 1:
        model.dispatch_lat0, model.dispatch_lat_per_rank = max(pts[0][1], 0.0), 0.0
    else:
        import numpy as np
        x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        slope, icpt = np.polyfit(x, y, 1)
        model.dispatch_lat_per_rank, model.dispatch_lat0 = max(float(slope), 0.0), max(float(icpt), 0.0)
    model.dispatch_fitted = True


def replay(model: MeasuredModel, run: dict) -> list[dict]:
    """The run's own arrivals and lengths through the simulator on the measured deployment."""
    from mesh.plan.perfmodel import Deployment
    dep = Deployment(1, model.measured_workers)
    reqs = run_requests(run)
    conc = run.get("concurrency") if run.get("rate") is None else None
    return simulate(reqs, model.cost(dep), model.limits, latency_s=model.latency_s,
                    concurrency=conc, horizon=run.get("duration_s") if conc else None)
