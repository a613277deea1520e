"""`mesh plan` as a function: a cost model + a workload + a target rate -> the cheapest deployment,
its predicted figures (with an interval where the prediction leaves what was measured), what the
prediction assumed, and where it extrapolates; one JSON-ready dict."""

from __future__ import annotations

from typing import Sequence

from mesh.plan import hardware
from mesh.plan.metrics import percentile, summarize, tpot_ms, ttft_ms
from mesh.plan.perfmodel import Deployment, Imbalance, RooflineModel
from mesh.plan.profile import build_model, lengths, model_shape
from mesh.plan.measured import MeasuredModel
from mesh.plan.search import Evaluation, Slo, Workload, evaluate, latency_of, margin, max_rate, search
from mesh.plan.simulate import SimRequest, simulate
from mesh.plan.workload import Dist, RequestSpec, cached_tokens, synthetic

PREDICTED_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "output_tokens_per_s", "throughput_rps",
                  "goodput_rps", "cached_token_share", "at_percentile")
# the figures given as [low, high] intervals
INTERVAL_KEYS = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"),
                 ("e2e_ms", "p50"), ("output_tokens_per_s", None), ("throughput_rps", None), ("goodput_rps", None))


def workload_from_specs(specs: Sequence[RequestSpec], n: int, seed: int = 0, block_size: int = 16) -> Workload:
    """A trace with arrival offsets is replayed (time-scaled to the target rate); otherwise its
    requests are resampled with Poisson arrivals."""
    cached = cached_tokens(specs, block_size)
    lens = [(s.prompt_tokens, c, s.output_tokens) for s, c in zip(specs, cached)]
    offs = [s.offset_s for s in specs]
    if all(o is not None for o in offs) and len(specs) >= 2:
        return Workload.trace(lens[:n] if n < len(lens) else lens, offs[:n] if n < len(offs) else offs)
    return Workload.poisson(lens, n, seed)


def synthetic_workload(prompt: Dist, output: Dist, n: int, seed: int = 0) -> Workload:
    gen = synthetic(prompt, output, seed)
    return Workload.poisson([(s.prompt_tokens, 0, s.output_tokens) for s in (next(gen) for _ in range(n))], n, seed)


def cost_model(reports: Sequence[dict], hw: str, model_name: str | None, gpu_profile: dict | None = None):
    """The measured model (hw "cpu": this machine, from the profiles), or for a GPU the roofline from
    published figures, calibrated by a bench/gpu_serving.py profile when one is given."""
    if hw == "cpu":
        if not reports:
            raise ValueError("--hardware cpu plans from measurements: give --profile FILE "
                             "(or plan from published figures with --hardware h100|h200)")
        return build_model(reports)
    dev = hardware.device(hw)
    if model_name:
        shape, load = hardware.model(model_name), None
    else:
        shape = model_shape(reports[0]) if reports else None
        if shape is None and gpu_profile is not None:
            shape = hardware.model(gpu_profile["model"])
        if shape is None:
            raise ValueError(f"--hardware {hw} needs the model's shapes: name one with --model "
                             f"({', '.join(sorted(hardware.MODELS))})")
        load = reports[0].get("expert_load") if reports else None
    if gpu_profile is not None:
        from mesh.plan.gpu import GpuProfileModel
        return GpuProfileModel.build(dev, shape, gpu_profile, imbalance=Imbalance(load))
    return RooflineModel(dev, shape, imbalance=Imbalance(load))


def _predicted(ev: Evaluation) -> dict:
    return {k: ev.summary[k] for k in PREDICTED_KEYS}


def _pick(summary: dict, key: str, q: str | None):
    v = summary.get(key)
    return v.get(q) if q else v


def intervals(model, dep: Deployment, workload: Workload, rate: float, slo: Slo, central: dict) -> dict | None:
    """[low, high] of each INTERVAL_KEYS figure: the simulation repeated with every part of the step
    at the low, then the high end of its uncertainty; the range of the three runs (queueing need not
    be monotone in step time). None for models without an uncertainty."""
    variant = getattr(model, "with_variant", None)
    if variant is None:
        return None
    runs = [evaluate(variant(v), dep, workload, rate, slo).summary for v in (-1, 1)] + [central]
    out = {}
    for key, q in INTERVAL_KEYS:
        vals = [x for x in (_pick(s, key, q) for s in runs) if x is not None]
        if vals:
            out[f"{key}.{q}" if q else key] = [min(vals), max(vals)]
    return out


def step_stats(model, dep: Deployment, workload: Workload, rate: float) -> dict:
    """The simulated run's batches: mean sequences, tokens and context per step, and the largest."""
    acc = {"steps": 0, "seqs": 0.0, "tokens": 0.0, "decode": 0.0, "prefill": 0.0, "ctx": 0.0, "max_seqs": 0}
    cost = model.cost(dep)

    def recording(batches):
        b = batches[0]
        acc["steps"] += 1
        acc["seqs"] += b.seqs
        acc["tokens"] += b.tokens
        acc["decode"] += b.decode
        acc["prefill"] += b.prefill
        acc["ctx"] += b.ctx
        acc["max_seqs"] = max(acc["max_seqs"], b.seqs)
        return cost(batches)
    reqs = workload.at(rate)
    reqs = reqs[0::dep.gateways] if dep.expert_workers == 0 else reqs
    simulate(reqs, recording, model.limits_for(dep), gateways=1 if dep.expert_workers == 0 else dep.gateways,
             latency_s=latency_of(model, dep), max_time=1.5 * (reqs[-1].arrival if reqs else 0.0) + 60.0)
    n = max(acc["steps"], 1)
    return {k: acc[k] / n for k in ("seqs", "tokens", "decode", "prefill", "ctx")} | {"max_seqs": acc["max_seqs"]}


def extrapolation(model, dep: Deployment, workload: Workload, rate: float) -> list[str]:
    """Where the prediction for `dep` at `rate` leaves what was measured (empty: within the profiles)."""
    out = []
    if isinstance(model, MeasuredModel):
        near = model._nearest(dep.expert_workers)
        per_gateway = rate / dep.gateways
        if near.max_throughput_rps and per_gateway > 1.15 * near.max_throughput_rps:
            out.append(f"{per_gateway:g} req/s per gateway is {per_gateway / near.max_throughput_rps:.1f}x the highest "
                       f"rate completed while profiling --workers {near.workers} ({near.max_throughput_rps:.2f} req/s)")
        out += model.outside(dep, step_stats(model, dep, workload, rate))
    elif hasattr(model, "outside"):
        out += model.outside(dep, step_stats(model, dep, workload, rate))
    return out


def plan(model, workload: Workload, target_rps: float, slo: Slo, *, num_experts: int,
         max_devices: int = 64, max_workers: int | None = None, pool_sizes: Sequence[int] | None = None,
         find_max_rps: bool = True, with_intervals: bool = True) -> dict:
    if target_rps <= 0:
        raise ValueError(f"the target rate must be positive, got {target_rps}")
    res = search(model, workload, target_rps, slo, num_experts=num_experts, max_devices=max_devices,
                 max_workers=max_workers, pool_sizes=pool_sizes)
    has_slo = slo.ttft_ms is not None or slo.tpot_ms is not None
    out = {"target_rps": target_rps, "slo": slo.as_dict(), "slo_given": has_slo, "model": model.as_dict(),
           "candidates_evaluated": res.candidates, "feasible": res.best is not None}
    if res.best is None:
        closest = min(res.evaluated, key=lambda e: (not e.stable, -e.deployment.devices), default=None)
        what = "meets the SLOs" if has_slo else "keeps up (its queue grows)"
        out.update({"gateways": None, "expert_workers": None, "redundant_experts": None, "devices": None,
                    "reason": f"no deployment of at most {max_devices} devices {what}"
                              + (f" (largest tried {closest.deployment.as_dict()}: {closest.reason})" if closest else "")})
        return out
    best = res.best
    dep = best.deployment
    out.update(dep.as_dict())
    out["predicted"] = _predicted(best)
    # a margin is the slack of the SLOs: without SLOs there is none to report
    out["margin"] = margin(best, slo) if has_slo else None
    out["assumptions"] = model.assumptions(dep) if hasattr(model, "assumptions") else []
    out["extrapolation"] = extrapolation(model, dep, workload, target_rps)
    out["interval"] = intervals(model, dep, workload, target_rps, slo, best.summary) if with_intervals else None
    if find_max_rps:
        top = max_rate(model, dep, workload, slo, target_rps)
        out["max_rps"] = top
        out["max_rps_basis"] = f"the SLOs at p{slo.percentile:g}" if has_slo else "a queue that does not grow"
        out["capacity_margin"] = top / target_rps - 1.0
        if isinstance(model, MeasuredModel):
            near = model._nearest(dep.expert_workers)
            if near.max_throughput_rps and top / dep.gateways > 1.15 * near.max_throughput_rps:
                out["max_rps_extrapolated"] = (f"above the highest rate completed while profiling --workers "
                                               f"{near.workers} ({near.max_throughput_rps:.2f} req/s per gateway)")
    return out


def predict_requests(model, dep: Deployment, reqs: Sequence[SimRequest], slo: Slo = Slo()) -> dict:
    """Predicted figures (and their interval, where the model has one) for exactly these requests:
    what `mesh plan --validate` and bench/plan_accuracy.py compare with a measured run."""
    def run(m) -> dict:
        records = simulate(list(reqs), m.cost(dep), m.limits_for(dep), latency_s=latency_of(m, dep)) \
            if dep.expert_workers or dep.gateways == 1 else \
            [r for k in range(dep.gateways) for r in simulate(list(reqs)[k::dep.gateways], m.cost(dep),
                                                                 m.limits_for(dep), latency_s=latency_of(m, dep))]
        s = summarize(records, slo.ttft_ms, slo.tpot_ms)
        q = slo.percentile
        s["at_percentile"] = {"percentile": q, "ttft_ms": percentile([t for t in map(ttft_ms, records) if t is not None], q),
                              "tpot_ms": percentile([t for t in map(tpot_ms, records) if t is not None], q)}
        return s
    mid = run(model)
    out = {k: mid[k] for k in PREDICTED_KEYS}
    variant = getattr(model, "with_variant", None)
    if variant is not None:
        lo, hi = run(variant(-1)), run(variant(1))
        out["interval"] = {}
        for key, q in INTERVAL_KEYS:
            vals = [x for x in (_pick(lo, key, q), _pick(hi, key, q), _pick(mid, key, q)) if x is not None]
            if vals:
                out["interval"][f"{key}.{q}" if q else key] = [min(vals), max(vals)]
    return out


def predict(model, workload: Workload, rate: float, slo: Slo = Slo(), dep: Deployment | None = None) -> dict:
    """Predicted figures for one deployment (default: the first measured one) at `rate`."""
    dep = dep or Deployment(1, getattr(model, "measured_workers", 0))
    return _predicted(evaluate(model, dep, workload, rate, slo))


__all__ = ["plan", "predict", "predict_requests", "cost_model", "workload_from_specs", "synthetic_workload",
           "lengths", "MeasuredModel", "RooflineModel", "Slo", "Workload", "Deployment"]
