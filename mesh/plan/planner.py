"""`mesh plan` as a function: a cost model + a workload + a target rate -> the cheapest deployment
and its predicted figures, as one JSON-ready dict."""

from __future__ import annotations

from typing import Sequence

from mesh.plan import hardware
from mesh.plan.perfmodel import Deployment, Imbalance, MeasuredModel, RooflineModel
from mesh.plan.profile import build_model, lengths, model_shape
from mesh.plan.search import Evaluation, Slo, Workload, evaluate, margin, max_rate, search
from mesh.plan.workload import Dist, RequestSpec, cached_tokens, synthetic

PREDICTED_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "output_tokens_per_s", "throughput_rps",
                  "goodput_rps", "cached_token_share", "at_percentile")


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


def cost_model(reports: Sequence[dict], hw: str, model_name: str | None):
    """The measured model (hw "cpu": this machine, from the profiles) or the roofline for a GPU."""
    if hw == "cpu":
        if not reports:
            raise ValueError("--hardware cpu plans from measurements: give --profile report.json "
                             "(or plan from published figures with --hardware h100|h200)")
        return build_model(reports)
    dev = hardware.device(hw)
    if model_name:
        shape, load = hardware.model(model_name), None
    else:
        shape = model_shape(reports[0]) if reports else None
        if shape is None:
            raise ValueError(f"--hardware {hw} needs the model's shapes: name one with --model "
                             f"({', '.join(sorted(hardware.MODELS))})")
        load = reports[0].get("expert_load")
    return RooflineModel(dev, shape, imbalance=Imbalance(load))


def _predicted(ev: Evaluation) -> dict:
    return {k: ev.summary[k] for k in PREDICTED_KEYS}


def plan(model, workload: Workload, target_rps: float, slo: Slo, *, num_experts: int,
         max_devices: int = 64, max_workers: int | None = None, find_max_rps: bool = True) -> dict:
    if target_rps <= 0:
        raise ValueError(f"the target rate must be positive, got {target_rps}")
    res = search(model, workload, target_rps, slo, num_experts=num_experts, max_devices=max_devices,
                 max_workers=max_workers)
    out = {"target_rps": target_rps, "slo": slo.as_dict(), "model": model.as_dict(),
           "candidates_evaluated": res.candidates, "feasible": res.best is not None}
    if res.best is None:
        closest = min(res.evaluated, key=lambda e: (not e.stable, -e.deployment.devices), default=None)
        out.update({"gateways": None, "expert_workers": None, "redundant_experts": None, "devices": None,
                    "reason": f"no deployment of at most {max_devices} devices meets the SLOs"
                              + (f" (largest tried {closest.deployment.as_dict()}: {closest.reason})" if closest else "")})
        return out
    best = res.best
    out.update(best.deployment.as_dict())
    out["predicted"] = _predicted(best)
    out["margin"] = margin(best, slo)
    if find_max_rps:
        top = max_rate(model, best.deployment, workload, slo, target_rps)
        out["max_rps"] = top
        out["capacity_margin"] = top / target_rps - 1.0
        if out["margin"] is None:
            out["margin"] = out["capacity_margin"]
    return out


def predict(model, workload: Workload, rate: float, slo: Slo = Slo(), dep: Deployment | None = None) -> dict:
    """Predicted figures for one deployment (default: the measured one) at `rate`."""
    dep = dep or Deployment(1, getattr(model, "measured_workers", 0))
    return _predicted(evaluate(model, dep, workload, rate, slo))


__all__ = ["plan", "predict", "cost_model", "workload_from_specs", "synthetic_workload", "lengths",
           "MeasuredModel", "RooflineModel", "Slo", "Workload", "Deployment"]
