"""Published figures for planning what cannot be measured here: devices and model shapes.

Sources: the models' config.json files and model cards, vendor data sheets, DeepEP's and vLLM's
published measurements (the models' figures: their config.json files and model cards). Every efficiency below is an assumption stated where
it is used; the planner's roofline is checked against the published vLLM throughput of
Qwen3-Coder-30B-A3B on one H100 in tests/plan/test_plan.py.

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
    """What the roofline needs of a model: sizes in elements; bf16 (2 bytes) weights and KV.

    The layer mix: `attn_layers` of the `layers` have softmax attention over a KV cache (q_heads /
    kv_heads of head_dim; `attn_gate`: the query projection also produces an output gate, as in
    Qwen3-Next's gated attention); the other `linear_layers` are Gated DeltaNet (linear attention):
    no KV cache, a recurrent state per sequence of [linear_v_heads, linear_head_dim, linear_head_dim]
    in float32 plus a causal-convolution state of [conv_dim, conv_kernel - 1] in the model dtype.
    The parameters are counted from these shapes (`total_params` is the published total, a check)."""
    name: str
    hidden: int
    layers: int
    moe_layers: int
    experts: int
    top_k: int
    moe_intermediate: int
    total_params: float  # published total (the counted one is dense_params + routed_params)
    attn_layers: int  # layers with softmax attention over a KV cache
    q_heads: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2
    vocab: int = 151936
    tied_embeddings: bool = False
    shared_intermediate: int = 0  # a shared expert every token runs (0: none)
    dense_mlp_params: float = 0.0  # dense-MLP layers (mlp_only_layers), all together
    attn_gate: bool = False
    linear_layers: int = 0  # Gated DeltaNet layers
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_head_dim: int = 0
    conv_kernel: int = 0

    @property
    def expert_params(self) -> float:
        """Routed-expert parameters of one expert in one MoE layer (gate, up, down)."""
        return 3.0 * self.hidden * self.moe_intermediate

    @property
    def routed_params(self) -> float:
        return self.expert_params * self.experts * self.moe_layers

    @property
    def attn_params(self) -> float:
        """One softmax-attention layer's projections (q (+ gate), k, v, o)."""
        q = self.q_heads * self.head_dim
        return self.hidden * (q * (2 if self.attn_gate else 1) + 2 * self.kv_heads * self.head_dim) + q * self.hidden

    @property
    def linear_params(self) -> float:
        """One Gated DeltaNet layer: q, k, v and the output gate z in, beta and the decay (one each per
        value head), the causal convolution over q, k, v, and the output projection."""
        k = self.linear_k_heads * self.linear_head_dim
        v = self.linear_v_heads * self.linear_head_dim
        return self.hidden * (2 * k + 2 * v) + self.hidden * 2 * self.linear_v_heads + \
            self.conv_dim * self.conv_kernel + v * self.hidden

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_k_heads * self.linear_head_dim + self.linear_v_heads * self.linear_head_dim

    @property
    def dense_params(self) -> float:
        """Everything the gateway runs: embeddings, attention (softmax and linear), dense MLPs, routers,
        shared experts, lm_head."""
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        router = self.moe_layers * self.hidden * self.experts
        shared = self.moe_layers * 3 * self.hidden * self.shared_intermediate
        return (embed + self.attn_layers * self.attn_params + self.linear_layers * self.linear_params +
                self.dense_mlp_params + router + shared)

    @property
    def active_params(self) -> float:
        return self.dense_params + self.expert_params * self.top_k * self.moe_layers

    @property
    def kv_bytes_per_token(self) -> float:
        return self.attn_layers * 2 * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def seq_state_bytes(self) -> float:
        """Per-sequence state of the linear-attention layers: float32 recurrent state plus the
        convolution state; read and written every step."""
        state = self.linear_v_heads * self.linear_head_dim * self.linear_head_dim * 4
        conv = self.conv_dim * max(self.conv_kernel - 1, 0) * self.bytes_per_param
        return float(self.linear_layers * (state + conv))

    @property
    def attn_flops_per_ctx(self) -> float:
        """FLOPs per (query token, context position): QK^T and PV over every attention layer."""
        return 4.0 * self.attn_layers * self.q_heads * self.head_dim

    @property
    def linear_flops_per_token(self) -> float:
        """The DeltaNet recurrence per token: read, decay, update and read out each [dk, dv] state."""
        return 8.0 * self.linear_layers * self.linear_v_heads * self.linear_head_dim * self.linear_head_dim

    @classmethod
    def from_config(cls, cfg, name: str = "profiled") -> "ModelShape":
        """From a mesh.config.ModelConfig (a profiled model's config.json)."""
        h, i_moe = cfg.hidden_size, cfg.moe_intermediate_size
        moe = cfg.num_moe_layers
        dense_mlp = (cfg.num_layers - moe) * 3 * h * cfg.intermediate_size
        shape = cls(name, h, cfg.num_layers, moe, cfg.num_experts, cfg.top_k, i_moe, 0.0, cfg.num_layers,
                    cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, vocab=cfg.vocab_size,
                    tied_embeddings=bool(cfg.tie_word_embeddings),
                    shared_intermediate=cfg.shared_expert_intermediate_size, dense_mlp_params=float(dense_mlp))
        return replace(shape, total_params=shape.dense_params + shape.routed_params)


# The models' config.json files and model cards (docs/reference-figures.md). Qwen3-Coder-Next (hybrid): 48 layers, every 4th
# gated softmax attention (12 layers: 16 q / 2 kv heads of 256, 24 KiB of bf16 KV per token), the other
# 36 Gated DeltaNet (16 key heads, 32 value heads, dims 128, convolution kernel 4: a [32, 128, 128]
# float32 state of 2 MiB plus a [8192, 3] convolution state per sequence and layer, ~74 MiB per
# sequence in all, read and written every step); 512 experts top-10 plus a shared expert of 512;
# 80B total, 3B active (without the embeddings).
MODELS = {
    "qwen3-coder-30b-a3b": ModelShape("Qwen3-Coder-30B-A3B-Instruct", 2048, 48, 48, 128, 8, 768, 30.5e9,
                                      48, 32, 4, 128),
    "qwen3-coder-480b-a35b": ModelShape("Qwen3-Coder-480B-A35B-Instruct", 6144, 62, 62, 160, 8, 2560, 480e9,
                                        62, 96, 8, 128),
    "qwen3-coder-next": ModelShape("Qwen3-Coder-Next", 2048, 48, 48, 512, 10, 512, 80e9, 12, 16, 2, 256,
                                   shared_intermediate=512, attn_gate=True, linear_layers=36, linear_k_heads=16,
                                   linear_v_heads=32, linear_head_dim=128, conv_kernel=4),
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
