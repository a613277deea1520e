"""Deployments and the step-time model from published figures. Each model turns a `Deployment` into
the simulator's `StepCost` and `Limits` (the measured model of this machine is mesh.plan.measured).

Glossary:
- gateway: a process running the dense part (attention, router, shared expert, lm_head) and the
  scheduler; A gateways step in lockstep when they share an expert pool.
- expert worker: a device holding a shard of every MoE layer's experts; W of them form the pool.
  W = 0: no pool, every gateway holds all experts (A independent replicas).
- redundant experts: R extra expert copies per MoE layer over the pool (E + R slots, split evenly
  over the W workers), placed by mesh.parallel.placement.rebalance to even out hot experts.
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
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the engine's default chunked-prefill budget
    block_size: int = 16
    latency_s: float = 0.0
    imbalance: Imbalance = field(default_factory=Imbalance)
    scale: float = 1.0  # every step x this (the low/high ends of the prediction interval)

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
        head = sh.vocab * sh.hidden
        embed = 0 if sh.tied_embeddings else head  # input embeddings: only the batch's rows are read
        mem = (sh.dense_params - embed) * bpp + b.decode_ctx * sh.kv_bytes_per_token + 2 * b.seqs * sh.seq_state_bytes
        flops = (2 * (sh.dense_params - embed - head) * b.tokens + 2 * head * b.seqs + sh.attn_flops_per_ctx * b.ctx
                 + sh.linear_flops_per_token * b.tokens)
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
                return (max((m1 + m2) / dev.mem_bw, (f1 + f2) / dev.flops) + dev.step_overhead) * self.scale
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
            return (t_dense + t_exp + t_a2a + dev.step_overhead) * self.scale
        return pooled

    # reporting --------------------------------------------------------------------------
    SPREAD = 0.25  # the roofline's check against published serving figures holds within 25%

    def with_variant(self, variant: int) -> "RooflineModel":
        return replace(self, scale=1.0 + variant * self.SPREAD)

    def assumptions(self, dep: Deployment) -> list[dict]:
        d = self.device
        out = [{"what": "memory bandwidth", "assumed": f"{d.mem_bw / 1e12:.2f} TB/s (published copy rate x 0.85)"},
               {"what": "compute", "assumed": f"{d.flops / 1e12:.0f} TFLOP/s (published bf16 matmul x 0.5)"},
               {"what": "host overhead per step", "assumed": f"{d.step_overhead * 1e3:g} ms"},
               {"what": "device memory", "assumed": f"{d.usable:.0%} of {d.memory_bytes / 1e9:.0f} GB usable minus "
                                                    f"{d.workspace_bytes / 2**30:.0f} GiB"}]
        if dep.expert_workers:
            out.append({"what": "expert all-to-all", "assumed": f"{d.intra_bw / 1e9:.0f} GB/s and {d.intra_lat * 1e6:.0f} "
                        f"us per collective inside a node, {d.inter_bw / 1e9:.0f} GB/s and {d.inter_lat * 1e6:.0f} us "
                        "across (DeepEP's published figures)"})
        for a in out:
            if a["what"] != "device memory":  # decides what fits, not how fast
                a["spread"] = self.SPREAD
        return out

    def outside(self, dep: Deployment, step: dict) -> list[str]:
        return ["every step time comes from published figures (no profile of this hardware)"]

    def as_dict(self) -> dict:
        sh = self.shape
        return {"kind": "roofline", "device": self.device.name, "model": sh.name,
                "params": {"total_B": sh.total_params / 1e9, "dense_B": sh.dense_params / 1e9,
                           "active_B": sh.active_params / 1e9, "routed_B": sh.routed_params / 1e9},
                "kv_bytes_per_token": sh.kv_bytes_per_token, "seq_state_bytes": sh.seq_state_bytes,
                "step_overhead_ms": self.device.step_overhead * 1e3}
