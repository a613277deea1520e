"""Deployment search: the cheapest (gateways, expert workers, redundant experts) whose simulated
percentiles meet the SLOs at the target rate.

Method: for every pool size W (0 = each gateway holds all experts) the number of gateways needed is
found by doubling then bisection (more gateways never hurt: each holds fewer requests), for the
smallest few valid redundancy counts R; the cheapest total devices wins, then the smallest R, then
the largest margin. Every candidate is judged on the same requests (common random numbers: the
arrivals at rate r are one unit-rate sequence divided by r), so more traffic is never judged on a
luckier draw than less traffic.

"Meets" means: nothing left unfinished, the queue does not grow (the last quarter of arrivals waits
no more than 1.5x the second quarter, plus 50 ms), and each SLO holds at the chosen percentile.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from mesh.plan.metrics import percentile, summarize, ttft_ms, tpot_ms
from mesh.plan.perfmodel import Deployment, valid_redundancy
from mesh.plan.simulate import Limits, SimRequest, StepCost, simulate, simulate_replicas


# expert pool sizes tried: the sizes deployments use (a 64-way sweep of every count costs minutes)
POOL_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256)


def latency_of(model, dep: Deployment) -> float:
    """The client <-> engine time a model adds to every response of `dep` (models may make it depend
    on the deployment: `latency_for`)."""
    per = getattr(model, "latency_for", None)
    return per(dep) if per is not None else model.latency_s


class CostModel(Protocol):
    latency_s: float

    def cost(self, dep: Deployment) -> StepCost: ...
    def feasible(self, dep: Deployment) -> bool: ...
    def limits_for(self, dep: Deployment) -> Limits: ...


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentile: float = 90.0

    def as_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "percentile": self.percentile}


class Workload:
    """Request lengths plus unit-rate arrival times; `at(rate)` gives the requests for that rate."""

    def __init__(self, lengths: Sequence[tuple[int, int, int]], unit_arrivals: Sequence[float]):
        if not lengths:
            raise ValueError("the workload has no requests")
        self.lengths = list(lengths)  # (prompt, cached, output)
        self.unit = list(unit_arrivals)

    @classmethod
    def poisson(cls, lengths: Sequence[tuple[int, int, int]], n: int, seed: int = 0) -> "Workload":
        """`n` requests resampled from `lengths`, Poisson arrivals."""
        rng = random.Random(seed)
        picks = [lengths[rng.randrange(len(lengths))] for _ in range(n)] if len(lengths) != n else list(lengths)
        t, unit = 0.0, []
        for _ in range(n):
            t += rng.expovariate(1.0)
            unit.append(t)
        return cls(picks, unit)

    @classmethod
    def trace(cls, lengths: Sequence[tuple[int, int, int]], offsets: Sequence[float]) -> "Workload":
        """Replayed arrivals, rescaled so that the trace's mean rate is 1 request/s."""
        span = offsets[-1] - offsets[0] if len(offsets) > 1 else 1.0
        rate = (len(offsets) - 1) / span if span > 0 else 1.0
        return cls(lengths, [(o - offsets[0]) * rate for o in offsets])

    def at(self, rate: float) -> list[SimRequest]:
        return [SimRequest(u / rate, p, o, c) for u, (p, c, o) in zip(self.unit, self.lengths)]


@dataclass
class Evaluation:
    deployment: Deployment
    rate: float
    meets: bool
    summary: dict
    reason: str = ""
    stable: bool = True


def _stable(records: list[dict]) -> bool:
    recs = sorted(records, key=lambda r: r["sent_s"])
    n = len(recs)
    if n < 8:
        return all(r["code"] == "OK" for r in recs)
    q2 = [t for t in map(ttft_ms, recs[n // 4: n // 2]) if t is not None]
    q4 = [t for t in map(ttft_ms, recs[3 * n // 4:]) if t is not None]
    if not q2 or not q4:
        return False
    return sum(q4) / len(q4) <= 1.5 * sum(q2) / len(q2) + 50.0


def evaluate(model: CostModel, dep: Deployment, workload: Workload, rate: float, slo: Slo) -> Evaluation:
    reqs = workload.at(rate)
    span = reqs[-1].arrival if reqs else 0.0
    limits = model.limits_for(dep)
    # a stable deployment finishes soon after the last arrival; an overloaded one is stopped early
    bounds = dict(max_time=1.5 * span + 60.0, max_queue=max(64, len(reqs) // 5))
    if dep.expert_workers == 0:
        # replicas are statistically alike under round-robin: simulate one, on its share
        records = simulate(reqs[0::dep.gateways], model.cost(dep), limits, latency_s=latency_of(model, dep), **bounds)
    else:
        records = simulate(reqs, model.cost(dep), limits, gateways=dep.gateways, latency_s=latency_of(model, dep),
                           **bounds)
    summary = summarize(records, slo.ttft_ms, slo.tpot_ms)
    if dep.expert_workers == 0 and dep.gateways > 1:
        # one replica of A was simulated: the deployment serves A times its rates
        for key in ("throughput_rps", "output_tokens_per_s", "input_tokens_per_s", "goodput_rps"):
            summary[key] *= dep.gateways
    q = slo.percentile
    ttfts = [t for t in map(ttft_ms, records) if t is not None]
    tpots = [t for t in map(tpot_ms, records) if t is not None]
    summary["at_percentile"] = {"percentile": q, "ttft_ms": percentile(ttfts, q), "tpot_ms": percentile(tpots, q)}
    unfinished = sum(r["code"] != "OK" for r in records)
    stable = unfinished == 0 and _stable(records)
    reasons = []
    if not stable:
        reasons.append("overloaded: the queue grows" if not unfinished else f"{unfinished} requests unfinished")
    t, p = summary["at_percentile"]["ttft_ms"], summary["at_percentile"]["tpot_ms"]
    if slo.ttft_ms is not None and (t is None or t > slo.ttft_ms):
        reasons.append(f"p{q:g} TTFT {t:.0f} ms > {slo.ttft_ms:g} ms" if t is not None else "no TTFT")
    if slo.tpot_ms is not None and p is not None and p > slo.tpot_ms:
        reasons.append(f"p{q:g} TPOT {p:.1f} ms > {slo.tpot_ms:g} ms")
    return Evaluation(dep, rate, not reasons, summary, "; ".join(reasons), stable)


def margin(ev: Evaluation, slo: Slo) -> float | None:
    """The smallest relative slack of the SLOs at the percentile: 0.2 = 20% under the tightest."""
    at = ev.summary["at_percentile"]
    slack = [(limit - at[k]) / limit for k, limit in (("ttft_ms", slo.ttft_ms), ("tpot_ms", slo.tpot_ms))
             if limit is not None and at[k] is not None]
    return min(slack) if slack else None


@dataclass
class PlanResult:
    best: Evaluation | None
    evaluated: list[Evaluation] = field(default_factory=list)
    max_rps: float | None = None

    @property
    def candidates(self) -> int:
        return len(self.evaluated)


def _min_gateways(check: Callable[[int], Evaluation | None], limit: int) -> tuple[int, Evaluation] | None:
    """Smallest A in [1, limit] with check(A).meets, assuming it is monotone in A."""
    lo, hi, ev_hi = 0, 1, None
    while hi <= limit:
        ev = check(hi)
        if ev is None:
            return None
        if ev.meets:
            ev_hi = ev
            break
        lo, hi = hi, hi * 2
    if ev_hi is None:
        if lo < limit:
            ev = check(limit)
            if ev is not None and ev.meets:
                hi, ev_hi = limit, ev
        if ev_hi is None:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ev = check(mid)
        if ev is not None and ev.meets:
            hi, ev_hi = mid, ev
        else:
            lo = mid
    return hi, ev_hi


def search(model: CostModel, workload: Workload, rate: float, slo: Slo, *, num_experts: int,
           max_devices: int = 64, max_workers: int | None = None, pooled: bool = True,
           colocated: bool = True, pool_sizes: Sequence[int] | None = None) -> PlanResult:
    """The cheapest deployment meeting `slo` at `rate`; PlanResult.best is None when none within
    `max_devices` does. `pool_sizes`: only these expert-worker counts (0: experts in the gateways).
    A model whose `redundancy` attribute is False (what `mesh serve` can start) gets only pools that
    split the experts evenly without redundant copies."""
    result = PlanResult(None)
    cache: dict[Deployment, Evaluation] = {}

    def ev_of(dep: Deployment) -> Evaluation | None:
        if not model.feasible(dep):
            return None
        if dep not in cache:
            cache[dep] = evaluate(model, dep, workload, rate, slo)
            result.evaluated.append(cache[dep])
        return cache[dep]

    def better(ev: Evaluation) -> bool:
        b = result.best
        if b is None:
            return True
        key = lambda e: (e.deployment.devices, e.deployment.redundant_experts, -(margin(e, slo) or 0.0))
        return key(ev) < key(b)

    top = max_workers or max_devices
    sizes = [w for w in POOL_SIZES if w <= top] + ([top] if top not in POOL_SIZES else [])
    workers = ([0] if colocated else []) + (sorted(set(sizes)) if pooled else [])
    if pool_sizes is not None:
        workers = sorted({w for w in pool_sizes if w <= max_devices})
    for W in workers:
        if result.best is not None and W + 1 > result.best.deployment.devices:
            break
        limit = max_devices - W
        if result.best is not None:
            limit = min(limit, result.best.deployment.devices - W)
        if limit < 1:
            break
        rs = valid_redundancy(num_experts, W)
        if not getattr(model, "redundancy", True):
            rs = [0] if W == 0 or num_experts % W == 0 else []
        rs = [r for r in rs if model.feasible(Deployment(1, W, r))]  # memory does not depend on A
        if not rs:
            continue
        found = _min_gateways(lambda a: ev_of(Deployment(a, W, rs[0])), limit)
        if found is None:
            # the fewest redundant experts cannot do it within the limit; the most still might
            if len(rs) > 1:
                found = _min_gateways(lambda a: ev_of(Deployment(a, W, rs[-1])), limit)
            if found is None:
                continue
        a, ev = found
        for r in rs[1:]:  # more redundancy only pays if it saves gateways
            if a > 1 and r != ev.deployment.redundant_experts:
                fewer = _min_gateways(lambda x: ev_of(Deployment(x, W, r)), a - 1)
                if fewer is not None:
                    a, ev = fewer
        if better(ev):
            result.best = ev
    return result


def max_rate(model: CostModel, dep: Deployment, workload: Workload, slo: Slo, start: float,
             iters: int = 8) -> float:
    """The highest rate `dep` sustains within `slo` (bisection, relative precision ~2^-iters)."""
    lo, hi = 0.0, start
    while evaluate(model, dep, workload, hi, slo).meets:
        lo, hi = hi, hi * 2
        if hi > start * 1024:
            return hi
    for _ in range(iters):
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        if evaluate(model, dep, workload, mid, slo).meets:
            lo = mid
        else:
            hi = mid
        if lo == 0 and hi < start / 1024:
            break
    return lo
