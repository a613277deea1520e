"""GPU profiles: the JSON lines `bench/gpu_serving.py` prints on a GPU, as measured step times for the
planner (`mesh plan --hardware h100|h200 --gpu-profile FILE`).

What is read: `copy` (the GPU's name and its device-to-device copy rate), `load` (the preset), every
`decode` line (step time by batch at a context length), `prefill` lines when the bench printed them
(step time of one prefill step by tokens), and `mixed` (requests of mixed lengths run to completion).

How they become a step-time law (`GpuProfileModel`): the roofline's parts (mesh.plan.perfmodel),
with its constants measured instead of taken from data sheets,
    step = overhead + a * bytes / copy rate + c * decode tokens + f * prefill FLOPs
- overhead, a (bytes streamed per byte of the copy's rate) and c (compute per decode token) by least
  squares over the decode lines (bytes: dense weights, the experts a batch touches, the KV of every
  sequence, the recurrent state);
- f (seconds per prefill FLOP) from the prefill lines; without them, chosen so that the simulated
  mixed run takes its measured time (then that run is no independent check).
An expert pool splits the step between gateway and workers by the parts' own terms (bytes of dense
weights and KV vs expert weights; compute per token in proportion to active FLOPs) and adds the
all-to-alls from published figures (an assumption, listed). A profile of another model calibrates
the device only (the constants carry over: an assumption, listed).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from mesh.plan.fit import fit
from mesh.plan.hardware import Device, ModelShape
from mesh.plan.perfmodel import Deployment, RooflineModel
from mesh.plan.simulate import Batch, Limits, SimRequest, StepCost, simulate

# the presets bench/gpu_serving.py serves, by the planner's model names
PRESET_MODELS = {"coder-30b-a3b": "qwen3-coder-30b-a3b", "coder-480b-a35b": "qwen3-coder-480b-a35b",
                 "coder-next": "qwen3-coder-next"}
# the bench's engine for the mixed run (bench/gpu_serving.py main()) and its request lengths
MIXED_LIMITS = dict(max_num_seqs=256, max_num_batched_tokens=8192)
Z = 2.0


def load_gpu_profile(path: str | Path) -> dict:
    """Parse the bench's JSON lines; ValueError naming the file and what is missing."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    prof = {"path": str(path), "decode": [], "prefill": [], "mixed": None, "gpu": None, "copy_bytes_s": None,
            "preset": None}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg}): is this the output of bench/gpu_serving.py?") from None
        kind = rec.get("bench") if isinstance(rec, dict) else None
        if kind == "copy":
            prof["gpu"], prof["copy_bytes_s"] = rec.get("gpu"), float(rec["tb_s"]) * 1e12
        elif kind == "load":
            prof["preset"] = rec.get("preset")
        elif kind == "decode":
            prof["decode"].append((int(rec["batch"]), int(rec["ctx"]), float(rec["step_ms"]) / 1e3))
        elif kind == "prefill":
            prof["prefill"].append((int(rec.get("seqs", 1)), int(rec["tokens"]), int(rec.get("ctx", 0)),
                                    float(rec["step_ms"]) / 1e3))
        elif kind == "mixed":
            prof["mixed"] = rec
    missing = [k for k, v in (("copy", prof["copy_bytes_s"]), ("decode", prof["decode"])) if not v]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} lines: not a bench/gpu_serving.py run "
                         "(or one that stopped early)")
    if len(prof["decode"]) < 3:
        raise ValueError(f"{path} has {len(prof['decode'])} decode lines; the step-time fit needs at least 3 "
                         "batch sizes (bench/gpu_serving.py --batches 1,16,64,256)")
    prof["model"] = PRESET_MODELS.get(prof["preset"] or "", None)
    return prof


def device_matches(prof: dict, dev: Device) -> bool:
    gpu = (prof.get("gpu") or "").lower()
    key = dev.name.split()[0].lower()  # "h100", "h200"
    return key in gpu


def mixed_requests(n: int = 256, vocab: int = 151936) -> list[SimRequest]:
    """The bench's mixed run: the same seeded draws (token ids included, so the lengths come out equal)."""
    rng = random.Random(1)
    out = []
    for _ in range(n):
        p = rng.randint(64, 1024)
        for _ in range(p):
            rng.randrange(vocab)
        out.append(SimRequest(0.0, p, rng.randint(32, 256)))
    return out


@dataclass
class GpuProfileModel(RooflineModel):
    """The roofline with measured constants (see the module docstring)."""
    overhead_s: float = 0.0
    a: float = 1.0  # streamed bytes cost a / copy rate each
    c: float = 0.0  # seconds of compute per decode token
    f: float = 0.0  # seconds per prefill FLOP
    copy_bytes_s: float = 1.0
    profile: dict = field(default_factory=dict)
    notes: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    decode_fit_rows: list[dict] = field(default_factory=list)
    max_batch: int = 0
    same_model: bool = True
    fit_se: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def build(cls, dev: Device, shape: ModelShape, prof: dict, **kw) -> "GpuProfileModel":
        if not device_matches(prof, dev):
            raise ValueError(f"--gpu-profile {prof['path']} was measured on {prof['gpu']}, not on {dev.name}: "
                             f"plan with the matching --hardware")
        from mesh.plan.hardware import MODELS
        m = cls(dev, shape, copy_bytes_s=prof["copy_bytes_s"], profile=prof, **kw)
        measured = MODELS.get(prof.get("model") or "")
        m.same_model = measured is None or measured.name == shape.name
        if m.same_model:
            m._calibrate(prof)
            if measured is None:
                m.notes.append({"what": "the profiled model", "assumed": f"{shape.name} (the profile does not name "
                                "a preset the planner knows)", "spread": 0.0})
            return m
        # the constants are the device's as the profiled model exercised it: fit them on that model's
        # shapes, then carry them over
        src = cls(dev, measured, copy_bytes_s=prof["copy_bytes_s"], profile=prof, **kw)
        src._calibrate(prof)
        for name in ("overhead_s", "a", "c", "f", "fit_se", "decode_fit_rows", "checks", "max_batch"):
            setattr(m, name, getattr(src, name))
        m.notes = list(src.notes) + [{
            "what": "step-time constants", "assumed": f"fitted on {measured.name}, carried over to {shape.name} "
            "(host overhead, streaming efficiency, compute per decode token and per prefill FLOP alike)",
            "spread": 0.25}]
        return m

    # -- the parts of a step ---------------------------------------------------------------
    def _bytes(self, b: Batch, tokens: float | None = None) -> tuple[float, float]:
        """(gateway bytes: dense weights + KV + state, expert bytes touched) of one step."""
        sh, bpp = self.shape, self.shape.bytes_per_param
        embed = 0 if sh.tied_embeddings else sh.vocab * sh.hidden
        dense = (sh.dense_params - embed) * bpp + b.decode_ctx * sh.kv_bytes_per_token + 2 * b.seqs * sh.seq_state_bytes
        t = b.tokens if tokens is None else tokens
        hit = 1.0 - (1.0 - sh.top_k / sh.experts) ** t if t else 0.0
        return dense, sh.experts * hit * sh.moe_layers * self._expert_layer_bytes()

    def _prefill_flops(self, b: Batch) -> tuple[float, float]:
        """(dense, expert) FLOPs of the step's prefill tokens."""
        sh = self.shape
        dense = (2 * (sh.dense_params - sh.vocab * sh.hidden) + sh.linear_flops_per_token) * b.prefill
        ctx = b.ctx - b.decode_ctx  # attention over the prefill tokens' contexts
        return dense + sh.attn_flops_per_ctx * max(ctx, 0.0), 2 * sh.expert_params * sh.top_k * sh.moe_layers * b.prefill

    def _expert_share(self) -> float:
        sh = self.shape
        e = sh.expert_params * sh.top_k * sh.moe_layers
        return e / max(sh.active_params, 1.0)

    def _step(self, b: Batch, consts=None) -> float:
        o, a, c, f = consts or (self.overhead_s, self.a, self.c, self.f)
        dense_b, exp_b = self._bytes(b)
        pd, pe = self._prefill_flops(b)
        return o + a * (dense_b + exp_b) / self.copy_bytes_s + c * b.decode + f * (pd + pe)

    def _calibrate(self, prof: dict) -> None:
        rows, y, self.decode_fit_rows = [], [], []
        for batch, ctx, step in prof["decode"]:
            b = Batch(seqs=batch, decode=batch, ctx=batch * ctx, decode_ctx=batch * ctx)
            dense_b, exp_b = self._bytes(b)
            rows.append([1.0, (dense_b + exp_b) / self.copy_bytes_s, batch])
            y.append(step)
        law = fit(("step", "streamed", "decode_tokens"), rows, y, min_rows=3, what="the GPU decode fit")
        self.overhead_s, self.a, self.c = law.coef
        self.fit_se = tuple((law.cov[i][i] ** 0.5) if law.cov else 0.0 for i in range(3))
        self.max_batch = max(b for b, _, _ in prof["decode"])
        for (batch, ctx, step), r in zip(prof["decode"], rows):
            self.decode_fit_rows.append({"batch": batch, "ctx": ctx, "measured_ms": step * 1e3,
                                         "fitted_ms": law(r) * 1e3})
        mixed = prof.get("mixed")
        if prof["prefill"]:
            pr, py = [], []
            for seqs, tokens, ctx, step in prof["prefill"]:
                n = tokens / seqs
                b = Batch(seqs=seqs, prefill=tokens, ctx=seqs * (n * ctx + n * (n + 1) / 2))
                dense_b, exp_b = self._bytes(b)
                pd, pe = self._prefill_flops(b)
                pr.append([pd + pe])
                py.append(step - self.overhead_s - self.a * (dense_b + exp_b) / self.copy_bytes_s)
            self.f = max(fit(("flops",), pr, py, min_rows=1, what="the GPU prefill fit").coef[0], 0.0)
            self.notes.append({"what": "prefill compute", "measured": f"{len(pr)} prefill lines",
                               "value": f"{1 / self.f / 1e12:.0f} TFLOP/s" if self.f else "free"})
            if mixed:
                self.checks["mixed"] = self._mixed_check(mixed)
        elif mixed:
            self.f = self._fit_f_to_mixed(mixed)
            self.notes.append({"what": "prefill compute",
                               "assumed": f"{1 / self.f / 1e12:.0f} TFLOP/s effective: fitted so the simulated "
                                          f"mixed run ({mixed['requests']} requests) takes its measured "
                                          f"{mixed['wall_s']} s (the profile has no prefill lines)",
                               "spread": 0.25})
            self.checks["mixed"] = self._mixed_check(mixed)
        else:
            self.f = 1.0 / self.device.flops
            self.notes.append({"what": "prefill compute", "assumed": f"{self.device.flops / 1e12:.0f} TFLOP/s "
                               "(published figure; the profile has neither prefill nor mixed lines)", "spread": 0.5})

    def _mixed_sim(self, mixed: dict, f: float) -> float:
        reqs = mixed_requests(int(mixed.get("requests") or 256), self.shape.vocab)
        lim = Limits(MIXED_LIMITS["max_num_seqs"], MIXED_LIMITS["max_num_batched_tokens"], None, self.block_size)
        consts = (self.overhead_s, self.a, self.c, f)
        recs = simulate(reqs, lambda bs: self._step(bs[0], consts), lim)
        return max(r["end_s"] for r in recs)

    def _fit_f_to_mixed(self, mixed: dict) -> float:
        target = float(mixed["wall_s"])
        lo, hi = 0.0, 1.0 / 1e12  # seconds per FLOP: free, 1 TFLOP/s
        if self._mixed_sim(mixed, lo) >= target:
            return lo
        for _ in range(40):
            mid = (lo + hi) / 2
            if self._mixed_sim(mixed, mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def _mixed_check(self, mixed: dict) -> dict:
        reqs = mixed_requests(int(mixed.get("requests") or 256), self.shape.vocab)
        wall = self._mixed_sim(mixed, self.f)
        tokens = sum(r.output for r in reqs)
        return {"requests": len(reqs), "prompt_tokens": sum(r.prompt for r in reqs), "output_tokens": tokens,
                "measured_output_tok_s": mixed.get("output_tok_s"), "simulated_output_tok_s": tokens / wall,
                "lengths_match": tokens == mixed.get("output_tokens") and
                sum(r.prompt for r in reqs) == mixed.get("prompt_tokens")}

    # -- what the search needs ------------------------------------------------------------
    def with_variant(self, variant: int) -> "GpuProfileModel":
        spread = max([n.get("spread", 0.0) for n in self.notes] + [0.0])
        o, a, c = self.overhead_s, self.a, self.c
        so, sa, sc = self.fit_se
        k = 1 + variant * 0.5 * spread
        return replace(self, overhead_s=max(o + variant * Z * so, 0.0), a=max(a + variant * Z * sa, 0.0),
                       c=max(c + variant * Z * sc, 0.0), f=self.f * k)

    def cost(self, dep: Deployment) -> StepCost:
        W = dep.expert_workers
        if W == 0:
            return lambda batches: self._step(batches[0])
        dev, sh = self.device, self.shape
        bw, lat = dev.a2a(dep.gateways + W)
        share = self._expert_share()

        def pooled(batches: Sequence[Batch]) -> float:
            gw = 0.0
            for b in batches:
                dense_b, _ = self._bytes(b)
                pd, _ = self._prefill_flops(b)
                gw = max(gw, self.overhead_s + self.a * dense_b / self.copy_bytes_s +
                         self.c * (1 - share) * b.decode + self.f * pd)
            tokens = sum(b.tokens for b in batches)
            rows = tokens * sh.top_k
            imb = self.imbalance.factor(W, dep.redundant_experts, rows)
            _, exp_b = self._bytes(Batch(), tokens)
            slots = (sh.experts + dep.redundant_experts) / W
            pe = sum(self._prefill_flops(b)[1] for b in batches)
            decode = sum(b.decode for b in batches)
            t_exp = (self.a * exp_b * slots / sh.experts / self.copy_bytes_s +
                     (self.c * share * decode + self.f * pe) * imb / W)
            send = max(max(b.tokens for b in batches) * sh.top_k, rows * imb / W) * sh.hidden * 2
            return gw + t_exp + sh.moe_layers * 2 * (lat + send / bw)
        return pooled

    def assumptions(self, dep: Deployment) -> list[dict]:
        out = [n for n in self.notes if "assumed" in n]
        if dep.expert_workers:
            out.append({"what": "expert all-to-all", "assumed": f"published figures: {self.device.intra_bw / 1e9:.0f} "
                        f"GB/s and {self.device.intra_lat * 1e6:.0f} us per collective inside a node, "
                        f"{self.device.inter_bw / 1e9:.0f} GB/s and {self.device.inter_lat * 1e6:.0f} us across",
                        "spread": 0.5})
            out.append({"what": "gateway/worker split of the measured step",
                        "assumed": "dense weights and KV on the gateway, touched experts on the workers; compute per "
                                   "decode token in proportion to active FLOPs", "spread": 0.2})
        out.append({"what": "device memory", "assumed": f"{self.device.usable:.0%} of "
                    f"{self.device.memory_bytes / 1e9:.0f} GB usable minus {self.device.workspace_bytes / 2**30:.0f} GiB"})
        return out

    def outside(self, dep: Deployment, step: dict) -> list[str]:
        out = []
        if step["max_seqs"] > self.max_batch:
            out.append(f"decode batches up to {step['max_seqs']} sequences; the GPU profile measured up to "
                       f"{self.max_batch}")
        if dep.expert_workers:
            out.append("expert pools were not measured on the GPU (the profile is of one GPU)")
        if not self.same_model:
            out.append(f"the GPU profile is of {self.profile.get('model')}, not {self.shape.name}")
        return out

    def as_dict(self) -> dict:
        d = super().as_dict()
        d.update({"kind": "gpu-profile", "gpu": self.profile.get("gpu"), "profile": self.profile.get("path"),
                  "profiled_model": self.profile.get("model"),
                  "law": {"overhead_ms": self.overhead_s * 1e3, "bytes_per_copy_byte": self.a,
                          "us_per_decode_token": self.c * 1e6,
                          "prefill_tflops": (1 / self.f / 1e12) if self.f else None,
                          "copy_tb_s": self.copy_bytes_s / 1e12},
                  "decode_fit": self.decode_fit_rows, "checks": self.checks})
        return d
