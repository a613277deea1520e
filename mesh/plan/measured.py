"""The measured performance model: step times of deployment shapes fitted from profiles of this
machine's `mesh serve`, part by part, and carried over to shapes that were not profiled.

A step of one gateway is four parts, each fitted to the server's own record of every step
(GetServerStats' recent_steps, kept by `mesh loadtest` in `runs[].profile.server_steps`; reports
without them: to the counters' intervals, `server_intervals`):

  host       engine-thread time outside the forward pass (scheduling, sampling, handing outputs to
             the server's event loop)            busy - forward       ~ steps, sequences
  dense      the gateway's share of the forward pass (attention, dense layers, router, lm_head)
                                                  forward - experts    ~ steps, decode tokens,
                                                                         prefill tokens, context
  experts    the routed experts' compute: in the gateway (W = 0) the time inside the in-process
             dispatch ~ steps, rows (token-expert pairs); with workers each worker's own compute
             (reported in the step headers) ~ steps, rows on the busiest worker
  transport  with workers: the round trip less the workers' compute ~ steps, rows sent

How the parts move between shapes (each carry-over is listed as an assumption, with the spread
used for the prediction interval):
- host and dense are the gateway's own work, and so is the time each request spends outside the
  engine: taken from the profiled shape nearest in workers, its contention (the engine thread's wall
  over CPU time) carried over unchanged;
- experts: cost x threads is kept when experts move between the gateway (its compute threads)
  and workers (each `mesh serve` worker gets max(1, cores // (W + 1)) threads), i.e. linear thread
  scaling; the busiest worker gets rows / W times the measured load imbalance of the placement; the
  fixed cost per step is a worker's = WORKER_FIXED_RATIO x the gateway's (see there);
- transport: the per-step part scales with the ranks each all-to-all spans (linear in ranks when
  two or more pool sizes were profiled, else proportional to ranks - 1); the per-row part is kept.
  Without any pool profile both are assumed (gloo over loopback TCP, `ASSUMED_TRANSPORT`: fast while
  every process has a core, scheduler-bound when the deployment's threads outnumber the cores).

Prediction intervals: every part's value +- 2 standard errors of its fit at the step's own
(sequences, tokens, context) (wider the further the step lies from what was profiled), plus the
carry-over spread of the part; the low and high variants are simulated like the central one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from mesh.plan.fit import LinearFit, fixed
from mesh.plan.perfmodel import Deployment, Imbalance
from mesh.plan.simulate import Batch, Limits, StepCost

# gloo all-to-all over loopback TCP between processes on one host, when no pool was profiled: per step
# a header exchange and per MoE layer three all-to-alls (counts, rows, outputs), rows moved twice
# (there and back) at 1 GB/s. Each collective waits for every rank's process to run: with a core for
# each (the gateway's threads plus every worker's fit the machine) 100 us + 40 us per rank; when the
# processes outnumber the cores, scheduling decides, 1.4 ms each (a --workers 2 profile of a 2-core VM,
# gateway and workers on one thread each, measured about 18 ms of transport per step for its 4 MoE
# layers, 13 collectives, with nothing else running; 27 ms while other jobs shared the machine). An
# assumption either way (its interval spans both); a `--workers N` profile replaces it.
ASSUMED_TRANSPORT = {"collective_s": 100e-6, "per_rank_s": 40e-6, "oversubscribed_s": 1.4e-3, "bandwidth": 1e9}
# A worker's fixed expert cost per step against the gateway's in-process one: the same kernels per row,
# but a worker makes a call per MoE layer after its rows arrive (the counts copied to the host, the
# receive buffers, the slot bookkeeping) where the gateway makes one fused call per layer. On the
# development machine the workers' fixed part was 2-3x the gateway's (1.0-1.3 against 0.44-0.67 ms
# per step of 4 MoE layers, one thread each); carried across at 2x, +-50% in the interval.
WORKER_FIXED_RATIO = 2.0
Z = 2.0  # prediction interval: +- 2 standard errors
SPREAD = {"nearest_shape": 0.10, "contention": 0.30, "thread_scaling": 0.30, "rank_scaling": 0.40,
          "assumed_transport": 1.0, "worker_fixed": 0.50}


def mesh_worker_threads(cores: int, workers: int) -> int:
    """Threads `mesh serve --workers W` gives each worker on a machine with `cores` cores."""
    return max(1, cores // (workers + 1))


@dataclass
class ShapeFit:
    """What one profiled shape (W expert workers, one gateway) measured."""
    workers: int
    host: LinearFit  # [steps, seqs]
    dense: LinearFit  # [steps, tokens, ctx]
    experts: LinearFit | None  # W = 0: [steps, rows]; W > 0: busiest worker [steps, rows on it]
    transport: LinearFit | None = None  # W > 0: [steps, rows sent]
    gateway_threads: int = 1
    worker_threads: int = 0
    rates: list[float] = field(default_factory=list)  # offered rates of the profiled levels
    max_throughput_rps: float = 0.0
    max_seqs_per_step: float = 0.0  # the largest mean batch of any profiled interval
    latency_s: float = 0.0  # client <-> engine time per request (calibrated: TTFT)
    latency_spread_s: float = 0.0
    replay: list[dict] = field(default_factory=list)  # per profiled level: simulated vs measured
    # per gateway part: the engine thread's wall time over its CPU time (1: it ran all the time; more:
    # it waited for a core, or for the GIL, while other processes or threads ran)
    stretch: dict[str, float] = field(default_factory=dict)
    source: str = "intervals"  # what the laws were fitted to: "steps" (the server's step records) or "intervals"
    samples: int = 0
    # what the server measured of the time outside its engine thread (arrival to inbox, engine to event
    # loop, ms) and the client's round trip of a trivial call: the visible part of latency_s (which also
    # holds the streaming RPC's own cost, seen only in TTFT)
    hops: dict[str, float] = field(default_factory=dict)
    rtt_ms: float = 0.0

    def as_dict(self) -> dict:
        return {"expert_workers": self.workers, "host": self.host.as_dict(), "dense": self.dense.as_dict(),
                "experts": self.experts.as_dict() if self.experts else None,
                "transport": self.transport.as_dict() if self.transport else None,
                "gateway_threads": self.gateway_threads, "worker_threads": self.worker_threads,
                "rates": self.rates, "max_throughput_rps": self.max_throughput_rps,
                "max_seqs_per_step": self.max_seqs_per_step, "latency_ms": self.latency_s * 1e3,
                "latency_spread_ms": self.latency_spread_s * 1e3, "stretch": self.stretch, "replay": self.replay,
                "fitted_to": f"{self.samples} {self.source}", "hops_ms": self.hops, "rtt_ms": self.rtt_ms}


@dataclass
class Part:
    """One part of a deployment's step: the law, how it was carried over, its extra relative spread."""
    law: LinearFit
    source: str  # "measured" or what was assumed
    spread: float = 0.0
    scale: float = 1.0  # the measured law's terms but the first times this (a thread ratio: compute)
    fixed_scale: float = 1.0  # its per-step term (the first) times this instead (a fixed overhead)
    fixed_spread: float = 0.0  # the per-step term's own extra relative spread

    def value(self, x: Sequence[float], variant: int) -> float:
        fixed = self.law.coef[0] * x[0] * self.fixed_scale
        mid = (self.law(x) - self.law.coef[0] * x[0]) * self.scale + fixed
        if not variant:
            return mid
        band = Z * self.law.se(x) * self.scale + self.spread * mid + self.fixed_spread * fixed
        return max(mid + variant * band, 0.0)


@dataclass
class ShapeParts:
    """The parts of one deployment and the assumptions they rest on."""
    host: Part
    dense: Part
    experts: Part
    transport: Part | None
    rank_scale: float = 1.0  # transport's per-step part x this
    assumptions: list[dict] = field(default_factory=list)
    measured_shape: bool = True


@dataclass
class MeasuredModel:
    """Step times per deployment from profiled shapes (see the module docstring)."""
    shapes: dict[int, ShapeFit]
    limits: Limits
    moe_layers: int
    top_k: int
    hidden: int
    num_experts: int
    act_bytes: int = 4
    cores: int = 1  # the profiled machine's cores (as mesh serve splits them between processes)
    imbalance: Imbalance = field(default_factory=Imbalance)
    variant: int = 0  # -1 / +1: the low / high end of the prediction interval
    latency_s: float = 0.0
    # `mesh serve` places experts contiguously, E / W per worker, without redundant copies: the search
    # keeps to pools it can start
    redundancy: bool = False

    # -- what the search needs ------------------------------------------------------------
    def feasible(self, dep: Deployment) -> bool:
        return True  # host memory is not modelled: the profiled machine held the whole model

    def limits_for(self, dep: Deployment) -> Limits:
        return self.limits

    @property
    def measured_workers(self) -> int:
        return min(self.shapes)

    def with_variant(self, variant: int) -> "MeasuredModel":
        m = replace(self, variant=variant)
        m._plans = {}
        return m

    def latency_for(self, dep: Deployment) -> float:
        """The time each request spends outside the engine thread (RPC, the server's event loop and
        threads) on `dep`: as calibrated on that shape, else the nearest shape's (the same gateway
        process); +- its spread in the interval's variants."""
        W = dep.expert_workers
        near = self._nearest(W)
        lat, spread = near.latency_s, near.latency_spread_s
        if W not in self.shapes:
            spread += SPREAD["contention"] * lat  # the same gateway process, its contention carried over
        return max(lat + self.variant * spread, 0.0)

    # -- the parts of a deployment --------------------------------------------------------
    def _nearest(self, workers: int) -> ShapeFit:
        return self.shapes[min(self.shapes, key=lambda w: (abs(w - workers), w))]

    def threads_of(self, workers: int) -> int:
        """Each worker's threads at pool size `workers` (as profiled, else as mesh serve assigns)."""
        if workers in self.shapes and self.shapes[workers].worker_threads:
            return self.shapes[workers].worker_threads
        return mesh_worker_threads(self.cores, workers)

    def plan(self, dep: Deployment) -> ShapeParts:
        cache = self.__dict__.setdefault("_plans", {})
        key = dep.expert_workers
        if key not in cache:
            cache[key] = self._plan(key)
        return cache[key]

    def _gateway_parts(self, W: int, notes: list[dict]) -> tuple[Part, Part]:
        """host and dense: the nearest profiled shape's laws. Moving experts changes what else runs
        beside the gateway; on the development machine the engine thread's stretch (its wall over CPU
        time, from waits for a core or the GIL) was no lower without workers than beside them, so the
        contention is carried over unchanged, with SPREAD["contention"] in the interval."""
        near = self._nearest(W)
        if W in self.shapes:
            return Part(near.host, "measured"), Part(near.dense, "measured")
        spread = SPREAD["contention"]
        st = near.stretch
        notes.append({"what": "gateway host and dense compute per step",
                      "assumed": f"as profiled with --workers {near.workers}, its contention unchanged (engine thread "
                                 f"stretched {st.get('host', 1.0):.2f}x in the host part, {st.get('dense', 1.0):.2f}x "
                                 "in the dense part by waits for a core or the GIL)", "spread": spread})
        return Part(near.host, "nearest shape", spread), Part(near.dense, "nearest shape", spread)

    def _plan(self, W: int) -> ShapeParts:
        notes: list[dict] = []
        exact = W in self.shapes
        host, dense = self._gateway_parts(W, notes)
        gt = self._nearest(W).gateway_threads
        if W == 0:
            if 0 in self.shapes:
                experts = Part(self.shapes[0].experts, "measured")
            else:
                pool = self._nearest(0)
                scale = pool.worker_threads / max(gt, 1)
                experts = Part(pool.experts, "thread scaling", SPREAD["thread_scaling"], scale,
                               1 / WORKER_FIXED_RATIO, SPREAD["worker_fixed"])
                notes.append({"what": "expert compute in the gateway",
                              "assumed": f"the --workers {pool.workers} workers' compute per row x "
                                         f"{pool.worker_threads}/{gt} threads (linear thread scaling); their fixed "
                                         f"cost per step / {WORKER_FIXED_RATIO:g} (one fused call per MoE layer "
                                         "instead of a worker's receive-and-call)",
                              "spread": SPREAD["thread_scaling"]})
            return ShapeParts(host, dense, experts, None, assumptions=notes, measured_shape=exact)
        wt = self.threads_of(W)
        pools = sorted(w for w in self.shapes if w > 0)
        if W in self.shapes:
            experts = Part(self.shapes[W].experts, "measured")
        elif pools:
            src = self._nearest_pool(W)
            scale = self.threads_of(src.workers) / wt
            experts = Part(src.experts, "rows per worker", SPREAD["nearest_shape"], scale)
            notes.append({"what": f"expert compute per worker at --workers {W}",
                          "assumed": f"the --workers {src.workers} workers' law per row on the busiest worker"
                                     + (f", x {self.threads_of(src.workers)}/{wt} threads" if scale != 1 else ""),
                          "spread": SPREAD["nearest_shape"]})
        else:
            local = self.shapes[0]
            scale = local.gateway_threads / wt
            experts = Part(local.experts, "thread scaling", SPREAD["thread_scaling"], scale,
                           WORKER_FIXED_RATIO, SPREAD["worker_fixed"])
            notes.append({"what": f"expert compute per worker at --workers {W}",
                          "assumed": f"the gateway's measured compute per row x {local.gateway_threads}/{wt} threads "
                                     "(linear thread scaling), rows / W on the busiest worker times the measured "
                                     f"placement imbalance; its fixed cost per step x {WORKER_FIXED_RATIO:g} (a worker's "
                                     "receive-and-call per MoE layer instead of one fused call)",
                          "spread": SPREAD["thread_scaling"]})
        transport, rank_scale = self._transport(W, pools, notes)
        return ShapeParts(host, dense, experts, transport, rank_scale, notes, exact)

    def _nearest_pool(self, W: int) -> ShapeFit:
        return self.shapes[min((w for w in self.shapes if w > 0), key=lambda w: (abs(w - W), w))]

    def _transport(self, W: int, pools: list[int], notes: list[dict]) -> tuple[Part, float]:
        ranks = 1 + W
        if W in self.shapes:
            return Part(self.shapes[W].transport, "measured"), 1.0
        if len(pools) >= 2:
            # per-step part linear in ranks through the profiled pool sizes
            xs = [1 + w for w in pools]
            ys = [self.shapes[w].transport.coef[0] for w in pools]
            n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
            sxx = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
            at = max(my + slope * (ranks - mx), 0.0)
            src = self._nearest_pool(W)
            scale = at / src.transport.coef[0] if src.transport.coef[0] else 1.0
            notes.append({"what": f"transport per step at {ranks} ranks",
                          "assumed": f"linear in ranks through the profiled pools ({', '.join(map(str, pools))} "
                                     "workers)", "spread": SPREAD["rank_scaling"] / 2})
            return Part(src.transport, "rank scaling", SPREAD["rank_scaling"] / 2), scale
        if pools:
            src = self.shapes[pools[0]]
            scale = (ranks - 1) / max(src.workers, 1)
            notes.append({"what": f"transport per step at {ranks} ranks",
                          "assumed": f"the --workers {src.workers} profile's, x {ranks - 1}/{src.workers} "
                                     "(each all-to-all's latency proportional to the peers it reaches)",
                          "spread": SPREAD["rank_scaling"]})
            return Part(src.transport, "rank scaling", SPREAD["rank_scaling"]), scale
        a = ASSUMED_TRANSPORT
        threads = self._nearest(0).gateway_threads + W * self.threads_of(W)
        if threads > self.cores:
            each = a["oversubscribed_s"]
            how = (f"{each * 1e3:g} ms each (the gateway's and {W} workers' {threads} threads outnumber the "
                   f"{self.cores} cores: every collective waits for the scheduler)")
        else:
            each = a["collective_s"] + a["per_rank_s"] * ranks
            how = f"{each * 1e6:.0f} us each ({a['collective_s'] * 1e6:.0f} us + {a['per_rank_s'] * 1e6:.0f} us per rank)"
        per_step = (1 + 3 * self.moe_layers) * each
        per_row = 2 * self.hidden * self.act_bytes / a["bandwidth"]
        notes.append({"what": "transport (no pool was profiled)",
                      "assumed": f"gloo over loopback: a header exchange per step and 3 all-to-alls per MoE layer, "
                                 f"{how}; rows there and back at {a['bandwidth'] / 1e9:g} GB/s",
                      "spread": SPREAD["assumed_transport"]})
        return Part(fixed(("steps", "rows"), [per_step, per_row]), "assumed", SPREAD["assumed_transport"]), 1.0

    # -- step time --------------------------------------------------------------------------
    def cost(self, dep: Deployment) -> StepCost:
        p, v, k, W = self.plan(dep), self.variant, self.top_k, dep.expert_workers

        def gateway(b: Batch) -> float:
            return p.host.value((1, b.seqs), v) + p.dense.value((1, b.decode, b.prefill, b.ctx), v)

        if W == 0:
            def colocated(batches: Sequence[Batch]) -> float:
                b = batches[0]
                return gateway(b) + p.experts.value((1, b.tokens * k), v)
            return colocated
        static = self.imbalance.static(W, dep.redundant_experts)

        def pooled(batches: Sequence[Batch]) -> float:
            rows = sum(b.tokens for b in batches) * k
            sent = max(b.tokens for b in batches) * k
            t = max(gateway(b) for b in batches) + p.experts.value((1, rows * static / W), v)
            tr = p.transport
            mid = tr.law.coef[0] * p.rank_scale + tr.law.coef[1] * sent
            if v:
                band = Z * tr.law.se((p.rank_scale, sent)) + tr.spread * mid
                mid = max(mid + v * band, 0.0)
            return t + mid
        return pooled

    # -- reporting -----------------------------------------------------------------------------
    def assumptions(self, dep: Deployment) -> list[dict]:
        notes = list(self.plan(dep).assumptions)
        if dep.expert_workers not in self.shapes:
            near = self._nearest(dep.expert_workers)
            notes.append({"what": "time outside the engine per request (RPC, the server's event loop)",
                          "assumed": f"{near.latency_s * 1e3:.1f} ms as calibrated with --workers {near.workers}",
                          "spread": SPREAD["contention"]})
        return notes

    def outside(self, dep: Deployment, step: dict) -> list[str]:
        """What about a predicted run lies outside the profiles: `step` holds the simulated run's
        mean batch (seqs, tokens, ctx per step) and its largest batch."""
        out = []
        near = self._nearest(dep.expert_workers)
        if dep.expert_workers not in self.shapes:
            out.append(f"--workers {dep.expert_workers} was not profiled (profiled: "
                       f"{', '.join(str(w) for w in sorted(self.shapes))})")
        cols = near.dense.outside((1, step["decode"], step["prefill"], step["ctx"]))
        seqs_hi = near.host.hi[1] if near.host.hi else 0.0
        if step["seqs"] > seqs_hi * 1.15:
            out.append(f"batches of {step['seqs']:.1f} sequences per step on average, beyond the profiled "
                       f"{seqs_hi:.1f}")
        elif cols:
            out.append(f"steps outside the profiled range of {', '.join(cols)} per step")
        return out

    def as_dict(self) -> dict:
        return {"kind": "measured", "shapes": {str(w): s.as_dict() for w, s in sorted(self.shapes.items())},
                "moe_layers": self.moe_layers, "top_k": self.top_k, "hidden": self.hidden,
                "num_experts": self.num_experts, "cores": self.cores, "latency_ms": self.latency_s * 1e3,
                "limits": vars(self.limits)}
