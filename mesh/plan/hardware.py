"""Published figures for planning what cannot be measured here: devices and model shapes.

Sources: the models' config.json files and model cards, vendor data sheets, DeepEP's and vLLM's
published measurements. Every efficiency below is an assumption stated where
it is used; the planner's roofline is checked against the published vLLM throughput of
Qwen3-Coder-30B-A3B on one H100 in tests/test_plan.py.

Figures per device are what serving kernels achieve, not peaks:
- memory bandwidth: the measured device-to-device copy (3.0 TB/s H100, 4.3 TB/s H200), times 0.85
  for weight streaming in small GEMMs;
- compute: the measured 8192^3 bf16 matmul (~790 TFLOP/s), times 0.5 for grouped expert GEMMs and
  attention at serving shapes;
- expert all-to-all: DeepEP's measured 155 GB/s per GPU inside a node (NVLink) and 50 GB/s between
  nodes (400 Gb/s InfiniBand), plus 30 us (inside a node) / 60 us (between nodes) per collective.
  That reproduces DeepEP's low-latency figures (128 tokens, hidden 7168, top-8: dispatch 77 us at
  EP8, 194 us at EP256; combine 114-369 us) within ~10%.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    mem_bw: float  # bytes/s achieved streaming weights and KV
    flops: float  # bf16 FLOP/s achieved in serving kernels
    intra_bw: float  # all-to-all bytes/s per device inside a node
    inter_bw: float  # ... between nodes
    intra_lat: float  # seconds per collective (dispatch or combine) inside a node
    inter_lat: float
    per_node: int = 8  # devices per node (an NVLink domain)
    step_overhead: float = 3e-3  # host work per engine step: schedule, launch, sample, stream
    usable: float = 0.90  # share of memory the server may fill
    workspace_bytes: float = 2 * GIB  # activations, communication buffers, CUDA context

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.usable - self.workspace_bytes

    def a2a(self, ranks: int) -> tuple[float, float]:
        """(bytes/s, seconds latency) of one all-to-all among `ranks` devices."""
        if ranks <= self.per_node:
            return self.intra_bw, self.intra_lat
        return self.inter_bw, self.inter_lat


DEVICES = {
    "h100": Device("H100 SXM 80GB", 80 * GB, 3.0e12 * 0.85, 790e12 * 0.5, 155 * GB, 50 * GB, 30e-6, 60e-6),
    "h200": Device("H200 141GB", 141 * GB, 4.3e12 * 0.85, 790e12 * 0.5, 155 * GB, 50 * GB, 30e-6, 60e-6),
}


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a model: sizes in elements; bf16 (2 bytes) weights and KV."""
    name: str
    hidden: int
    layers: int
    moe_layers: int
    experts: int
    top_k: int
    moe_intermediate: int
    total_params: float  # published total (dense part = total - routed experts)
    attn_layers: int  # layers with softmax attention over a KV cache
    q_heads: int
    kv_heads: int
    head_dim: int
    seq_state_bytes: float = 0.0  # per-sequence recurrent state (linear-attention layers), fp32
    bytes_per_param: int = 2

    @property
    def expert_params(self) -> float:
        """Routed-expert parameters of one expert in one MoE layer (gate, up, down)."""
        return 3.0 * self.hidden * self.moe_intermediate

    @property
    def routed_params(self) -> float:
        return self.expert_params * self.experts * self.moe_layers

    @property
    def dense_params(self) -> float:
        """Everything the gateway runs: embeddings, attention, norms, router, shared expert, lm_head."""
        return max(self.total_params - self.routed_params, 0.0)

    @property
    def active_params(self) -> float:
        return self.dense_params + self.expert_params * self.top_k * self.moe_layers

    @property
    def kv_bytes_per_token(self) -> float:
        return self.attn_layers * 2 * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def attn_flops_per_ctx(self) -> float:
        """FLOPs per (query token, context position): QK^T and PV over every attention layer."""
        return 4.0 * self.attn_layers * self.q_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg, name: str = "profiled") -> "ModelShape":
        """From a mesh.config.ModelConfig (a profiled model's config.json)."""
        h, i_moe = cfg.hidden_size, cfg.moe_intermediate_size
        moe = cfg.num_moe_layers
        dense_mlp = (cfg.num_layers - moe) * 3 * h * cfg.intermediate_size
        attn = cfg.num_layers * h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + \
            cfg.num_layers * cfg.num_heads * cfg.head_dim * h
        embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
        shared = moe * 3 * h * cfg.shared_expert_intermediate_size
        routed = moe * cfg.num_experts * 3 * h * i_moe
        return cls(name, h, cfg.num_layers, moe, cfg.num_experts, cfg.top_k, i_moe,
                   float(dense_mlp + attn + embed + shared + routed + moe * h * cfg.num_experts),
                   cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)


# MODELS.md. Qwen3-Coder-Next: 12 of 48 layers have softmax attention (24 KiB KV per token); the 36
# Gated DeltaNet layers hold ~74 MiB of fp32 state per sequence, read and written every step.
MODELS = {
    "qwen3-coder-30b-a3b": ModelShape("Qwen3-Coder-30B-A3B-Instruct", 2048, 48, 48, 128, 8, 768, 30.5e9,
                                      48, 32, 4, 128),
    "qwen3-coder-480b-a35b": ModelShape("Qwen3-Coder-480B-A35B-Instruct", 6144, 62, 62, 160, 8, 2560, 480e9,
                                        62, 96, 8, 128),
    "qwen3-coder-next": ModelShape("Qwen3-Coder-Next", 2048, 48, 48, 512, 10, 512, 80e9, 12, 16, 2, 256,
                                   seq_state_bytes=74 * (1 << 20)),
}


def device(name: str) -> Device:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(sorted(DEVICES))}") from None


def model(name: str) -> ModelShape:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}") from None


def with_overhead(dev: Device, step_overhead: float) -> Device:
    return replace(dev, step_overhead=step_overhead)
