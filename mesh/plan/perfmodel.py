"""Step-time models: what one engine step costs on a deployment, fitted from measured profiles or
derived from published hardware figures. Each model turns a `Deployment` into the simulator's
`StepCost` and `Limits`.

Glossary:
- gateway: a process running the dense part (attention, router, shared expert, lm_head) and the
  scheduler; A gateways step in lockstep when they share an expert pool.
- expert worker: a device holding a shard of every MoE layer's experts; W of them form the pool.
  W = 0: no pool, every gateway holds all experts (A independent replicas).
- redundant experts: R extra expert copies per MoE layer over the pool (E + R slots, split evenly
  over the W workers), placed by mesh.parallel.placement.rebalance to even out hot experts.

Measured model (this machine): seconds per step = step_s + decode_s * decode tokens +
prefill_s * prefill tokens + ctx_s * attention work (token x context), least-squares fitted from a
load test's busy intervals; see `fit_step_time`. Moving experts into a pool splits the per-token
cost by `expert_share` (the routed experts' share of the active FLOPs, from the model's shapes) and
adds the dispatch cost: per MoE layer two all-to-alls of latency(ranks) + bytes / bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from mesh.plan.hardware import Device, ModelShape
from mesh.plan.simulate import Batch, Limits, StepCost


@dataclass(frozen=True, order=True)
class Deployment:
    gateways: int
    expert_workers: int = 0
    redundant_experts: int = 0

    @property
    def devices(self) -> int:
        return self.gateways + self.expert_workers

    def as_dict(self) -> dict:
        return {"gateways": self.gateways, "expert_workers": self.expert_workers,
                "redundant_experts": self.redundant_experts, "devices": self.devices}


# ---- expert load imbalance -------------------------------------------------------------------
class Imbalance:
    """How much more than the mean the busiest expert worker gets.

    static(W, R): from a measured load heatmap [L, E], placed by rebalance() on W ranks with E + R
    slots: the mean over layers of max rank load / mean rank load (1.0 without a heatmap: assume a
    balanced placement). factor(W, R, rows): times the per-step fluctuation of routing `rows`
    token-expert pairs, the expected maximum of W ~Poisson(rows / W) counts: 1 + sqrt(2 ln W / m).
    """

    def __init__(self, load: Sequence[Sequence[float]] | None = None, max_layers: int = 8):
        rows = [list(map(float, r)) for r in (load or []) if sum(r) > 0]
        if len(rows) > max_layers:  # evenly spaced layers: rebalance is a Python loop per layer
            rows = [rows[round(i * (len(rows) - 1) / (max_layers - 1))] for i in range(max_layers)]
        self.load = rows
        self._cache: dict[tuple[int, int], float] = {}

    def static(self, workers: int, redundant: int) -> float:
        if workers <= 1 or not self.load:
            return 1.0
        key = (workers, redundant)
        if key not in self._cache:
            import torch
            from mesh.parallel.placement import rebalance
            E = len(self.load[0])
            slots = (E + redundant) // workers
            pl = rebalance(torch.tensor(self.load, dtype=torch.float64), workers, slots)
            per_rank = pl.rank_load(torch.tensor(self.load, dtype=torch.float64))  # [L, W]
            ratios = per_rank.max(1).values / per_rank.mean(1).clamp(min=1e-12)
            self._cache[key] = float(ratios.mean())
        return self._cache[key]

    def factor(self, workers: int, redundant: int, rows: float) -> float:
        if workers <= 1:
            return 1.0
        m = max(rows / workers, 1.0)
        return self.static(workers, redundant) * (1.0 + math.sqrt(2.0 * math.log(workers) / m))


def valid_redundancy(num_experts: int, workers: int, count: int = 3) -> list[int]:
    """The smallest `count` values of R >= 0 with E + R divisible by W (every worker, equal slots)."""
    if workers <= 0:
        return [0]
    r0 = (-num_experts) % workers
    return [r0 + i * workers for i in range(count)]


# ---- measured -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepFit:
    """seconds = step_s + decode_s*decode + prefill_s*prefill + ctx_s*ctx (all >= 0)."""
    step_s: float
    decode_s: float
    prefill_s: float
    ctx_s: float = 0.0
    residual: float = 0.0  # relative RMS error of the fit over its intervals
    intervals: int = 0

    def __call__(self, b: Batch) -> float:
        return self.step_s + self.decode_s * b.decode + self.prefill_s * b.prefill + self.ctx_s * b.ctx

    def scaled(self, k: float) -> "StepFit":
        return replace(self, step_s=self.step_s * k, decode_s=self.decode_s * k, prefill_s=self.prefill_s * k,
                       ctx_s=self.ctx_s * k)

    def as_dict(self) -> dict:
        return {"step_ms": self.step_s * 1e3, "decode_ms_per_token": self.decode_s * 1e3,
                "prefill_ms_per_token": self.prefill_s * 1e3, "ctx_ns_per_unit": self.ctx_s * 1e9,
                "residual": self.residual, "intervals": self.intervals}


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares for a handful of columns: solve, drop the most negative
    coefficient's column, repeat."""
    import numpy as np
    A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    active = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    while active:
        scale = np.linalg.norm(A[:, active], axis=0)
        scale[scale == 0] = 1.0
        x, *_ = np.linalg.lstsq(A[:, active] / scale, b, rcond=None)
        x = x / scale
        if (x >= 0).all():
            coef[:] = 0
            coef[active] = x
            return coef.tolist()
        active.pop(int(np.argmin(x)))
    return coef.tolist()


def fit_step_time(intervals: Sequence[Sequence[float]], fixed: tuple[float, float] | None = None) -> StepFit:
    """Fit from busy intervals [t0, t1, busy_s, steps, decode, prefill, ctx]: in each, the engine's
    steps add up to its busy time, so busy_s = step_s*steps + decode_s*decode + prefill_s*prefill
    + ctx_s*ctx. `fixed`: (prefill_s, ctx_s) known from elsewhere (a profile's prefill tokens come
    with its decode tokens in a near-constant ratio, so the intervals alone cannot split them).
    Intervals without steps are skipped."""
    rows, y = [], []
    for iv in intervals:
        _t0, _t1, busy, steps, dec, pre, ctx = iv[:7]
        if steps <= 0 or busy <= 0:
            continue
        if fixed is None:
            rows.append([steps, dec, pre, ctx])
            y.append(busy)
        else:
            rows.append([steps, dec])
            y.append(busy - fixed[0] * pre - fixed[1] * ctx)
    need = 3 if fixed is not None else 5
    if len(rows) < need:
        raise ValueError(f"a step-time fit needs at least {need} busy intervals, the profiles hold {len(rows)}: "
                         "profile longer or at a higher rate")
    c = _nnls(rows, y)
    if fixed is not None:
        c = c + list(fixed)
    full = [[iv[3], iv[4], iv[5], iv[6]] for iv in intervals if iv[3] > 0 and iv[2] > 0]
    busy = [iv[2] for iv in intervals if iv[3] > 0 and iv[2] > 0]
    pred = [sum(a * b for a, b in zip(r, c)) for r in full]
    rms = math.sqrt(sum((p - t) ** 2 for p, t in zip(pred, busy)) / len(busy)) / (sum(busy) / len(busy))
    return StepFit(c[0], c[1], c[2], c[3], rms, len(rows))


@dataclass
class MeasuredModel:
    """The measured deployment's step fit, extended to other deployments.

    fit: per-gateway step time as measured (with the experts wherever they were: `measured_workers`).
    expert_share: the routed experts' share of the per-token compute (moved to the pool when W > 0).
    dispatch_lat_s: seconds per all-to-all (dispatch or combine) per MoE layer, as a function of
    ranks: lat0 + lat_per_rank * ranks. dispatch_bw: bytes/s.
    """
    fit: StepFit
    limits: Limits
    moe_layers: int
    top_k: int
    hidden: int
    num_experts: int
    expert_share: float = 0.5
    measured_workers: int = 0
    dispatch_lat0: float = 150e-6  # gloo over loopback TCP: an assumption unless fitted
    dispatch_lat_per_rank: float = 20e-6
    dispatch_bw: float = 2e9
    act_bytes: int = 4  # float32 activations on CPU
    latency_s: float = 0.0  # client <-> server time added to every response
    imbalance: Imbalance = field(default_factory=Imbalance)
    dispatch_fitted: bool = False

    def _a2a(self, ranks: int, nbytes: float) -> float:
        return self.dispatch_lat0 + self.dispatch_lat_per_rank * ranks + nbytes / self.dispatch_bw

    def feasible(self, dep: Deployment) -> bool:
        return True  # host memory is not modelled: the measured machine held the whole model

    def limits_for(self, dep: Deployment) -> Limits:
        return self.limits

    def cost(self, dep: Deployment) -> StepCost:
        f, W = self.fit, dep.expert_workers
        if W == 0 or (W == self.measured_workers and dep.gateways == 1 and dep.redundant_experts == 0):
            if W == 0 and self.measured_workers > 0:
                # experts back into the gateway: no dispatch, expert compute local again
                strip = self.moe_layers * 2 * self._a2a(1 + self.measured_workers, 0.0)
                f = replace(f, step_s=max(f.step_s - strip, 0.0))
            return lambda batches: max(f(b) for b in batches)
        per_tok_expert = self.expert_share * f.prefill_s  # per token, all MoE layers
        if self.measured_workers == 0:
            dense = replace(f, decode_s=max(f.decode_s - per_tok_expert, 0.0),
                            prefill_s=max(f.prefill_s - per_tok_expert, 0.0))
        else:
            dense = replace(f, step_s=max(f.step_s - self.moe_layers * 2 *
                                          self._a2a(1 + self.measured_workers, 0.0), 0.0))
            per_tok_expert *= self.measured_workers  # measured per token with the work split W ways
        ranks, k, L = dep.gateways + W, self.top_k, self.moe_layers

        def cost(batches: Sequence[Batch]) -> float:
            t_dense = max(dense(b) for b in batches)
            tokens = sum(b.tokens for b in batches)
            rows = tokens * k
            imb = self.imbalance.factor(W, dep.redundant_experts, rows)
            t_exp = per_tok_expert * tokens * imb / W
            gw_bytes = max(b.tokens for b in batches) * k * self.hidden * self.act_bytes
            wk_bytes = rows * imb / W * self.hidden * self.act_bytes
            return t_dense + t_exp + L * 2 * self._a2a(ranks, max(gw_bytes, wk_bytes))
        return cost

    def as_dict(self) -> dict:
        return {"kind": "measured", "step_fit": self.fit.as_dict(), "expert_share": self.expert_share,
                "measured_expert_workers": self.measured_workers, "latency_ms": self.latency_s * 1e3,
                "dispatch": {"lat0_us": self.dispatch_lat0 * 1e6, "lat_per_rank_us": self.dispatch_lat_per_rank * 1e6,
                             "bandwidth_GBps": self.dispatch_bw / 1e9,
                             "source": "fitted" if self.dispatch_fitted else "assumed (gloo, loopback)"},
                "limits": vars(self.limits)}


# ---- published figures ---------------------------------------------------------------------
@dataclass
class RooflineModel:
    """Step time from device figures and model shapes: each part takes the longer of its memory
    traffic and its FLOPs (a roofline), plus a fixed host overhead per step.

    Gateway: dense weights read once per step, KV of every decode token's context, per-sequence
    recurrent state read and written; FLOPs 2 x dense params per token (lm_head only for the
    sequences that sample) plus attention. Experts: the weights of the experts hit this step (expected
    distinct experts of T tokens routed top-k of E), 2 x 3 x hidden x intermediate FLOPs per routed
    row, on the busiest worker. Dispatch: per MoE layer two all-to-alls (dispatch, combine) of bf16
    rows. Lockstep: all parts run one after the other (no overlap: conservative)."""
    device: Device
    shape: ModelShape
    vocab: int = 151936
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the engine's default chunked-prefill budget
    block_size: int = 16
    latency_s: float = 0.0
    imbalance: Imbalance = field(default_factory=Imbalance)

    # memory -----------------------------------------------------------------------------
    def _expert_layer_bytes(self) -> float:
        return self.shape.expert_params * self.shape.bytes_per_param

    def weight_bytes_gateway(self, dep: Deployment) -> float:
        sh = self.shape
        dense = sh.dense_params * sh.bytes_per_param
        return dense + (sh.routed_params * sh.bytes_per_param if dep.expert_workers == 0 else 0.0)

    def worker_bytes(self, dep: Deployment) -> float:
        if dep.expert_workers == 0:
            return 0.0
        slots = (self.shape.experts + dep.redundant_experts) / dep.expert_workers
        return math.ceil(slots) * self.shape.moe_layers * self._expert_layer_bytes()

    def feasible(self, dep: Deployment) -> bool:
        dev = self.device
        free = dev.usable_bytes - self.weight_bytes_gateway(dep)
        need_kv = 64 * 1024 * self.shape.kv_bytes_per_token  # room for at least one long sequence
        return free > need_kv + self.shape.seq_state_bytes and self.worker_bytes(dep) <= dev.usable_bytes

    def limits_for(self, dep: Deployment) -> Limits:
        free = self.device.usable_bytes - self.weight_bytes_gateway(dep)
        seqs = self.max_num_seqs
        if self.shape.seq_state_bytes:
            seqs = max(1, min(seqs, int(0.5 * free / self.shape.seq_state_bytes)))
            free -= seqs * self.shape.seq_state_bytes
        blocks = int(free / (self.shape.kv_bytes_per_token * self.block_size))
        return Limits(seqs, self.max_num_batched_tokens, blocks, self.block_size)

    # time -------------------------------------------------------------------------------
    def _dense(self, b: Batch) -> tuple[float, float]:
        sh, bpp = self.shape, self.shape.bytes_per_param
        head = self.vocab * sh.hidden
        mem = sh.dense_params * bpp + b.decode_ctx * sh.kv_bytes_per_token + 2 * b.seqs * sh.seq_state_bytes
        flops = 2 * (sh.dense_params - 2 * head) * b.tokens + 2 * head * b.seqs + sh.attn_flops_per_ctx * b.ctx
        return mem, flops

    def _experts(self, tokens: float, rows_on_worker: float, slots: float) -> tuple[float, float]:
        sh = self.shape
        hit = 1.0 - (1.0 - sh.top_k / sh.experts) ** tokens if tokens else 0.0
        mem = slots * hit * sh.moe_layers * self._expert_layer_bytes()
        flops = 2 * sh.expert_params * rows_on_worker * sh.moe_layers
        return mem, flops

    def cost(self, dep: Deployment) -> StepCost:
        dev, sh, W = self.device, self.shape, dep.expert_workers
        if W == 0:
            def colocated(batches: Sequence[Batch]) -> float:
                b = batches[0]
                m1, f1 = self._dense(b)
                m2, f2 = self._experts(b.tokens, b.tokens * sh.top_k, sh.experts)
                return max((m1 + m2) / dev.mem_bw, (f1 + f2) / dev.flops) + dev.step_overhead
            return colocated
        ranks = dep.gateways + W
        bw, lat = dev.a2a(ranks)
        slots = (sh.experts + dep.redundant_experts) / W

        def pooled(batches: Sequence[Batch]) -> float:
            t_dense = 0.0
            for b in batches:
                m, f = self._dense(b)
                t_dense = max(t_dense, max(m / dev.mem_bw, f / dev.flops))
            tokens = sum(b.tokens for b in batches)
            rows = tokens * sh.top_k
            per_worker = rows * self.imbalance.factor(W, dep.redundant_experts, rows) / W
            m, f = self._experts(tokens, per_worker, slots)
            t_exp = max(m / dev.mem_bw, f / dev.flops)
            send = max(max(b.tokens for b in batches) * sh.top_k, per_worker) * sh.hidden * 2
            t_a2a = sh.moe_layers * 2 * (lat + send / bw)
            return t_dense + t_exp + t_a2a + dev.step_overhead
        return pooled

    def as_dict(self) -> dict:
        sh = self.shape
        return {"kind": "roofline", "device": self.device.name, "model": sh.name,
                "params": {"total_B": sh.total_params / 1e9, "dense_B": sh.dense_params / 1e9,
                           "active_B": sh.active_params / 1e9, "routed_B": sh.routed_params / 1e9},
                "kv_bytes_per_token": sh.kv_bytes_per_token, "seq_state_bytes": sh.seq_state_bytes,
                "step_overhead_ms": self.device.step_overhead * 1e3}
