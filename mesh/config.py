"""Model and engine configuration: dataclasses validated on creation.

`ModelConfig` is read from a Hugging Face `config.json`. Only what the runtime needs is kept, under
one name per concept, whichever spelling the checkpoint used (transformers 4.x and 5.x differ:
`rope_theta` vs `rope_parameters`, `torch_dtype` vs `dtype`, `num_experts` vs `num_local_experts`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# architecture name in config.json -> family name used by mesh.model
ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen3NextForCausalLM": "qwen3_next",
}
FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "qwen3_moe" | "qwen2_moe" | "mixtral" | "qwen3_next"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers)
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[bool, ...]  # per layer: True when the MLP is a sparse MoE block
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    qk_norm: bool = False
    qkv_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"  # what the checkpoint was saved in
    # The hybrid Qwen3-Next family (Qwen3-Coder-Next): per layer full attention or a Gated DeltaNet
    # linear-attention layer; () means every layer is full attention.
    layer_types: tuple[str, ...] = ()
    attn_output_gate: bool = False  # q_proj also yields a per-head gate: out * sigmoid(gate) before o_proj
    zero_centered_norm: bool = False  # RMSNorm weights are w with the norm scaled by (1 + w), in float32
    rotary_dim: int = 0  # dims of each head the rotary embedding turns (partial rotary); 0: head_dim
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0

    def __post_init__(self) -> None:
        if self.family not in ARCHITECTURES.values():
            raise ConfigError(f"unknown model family {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "top_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if len(self.moe_layers) != self.num_layers:
            raise ConfigError("moe_layers must have one entry per layer")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = sorted(set(self.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION})
            if bad:
                raise ConfigError(f"unsupported layer types {bad}; supported: {FULL_ATTENTION}, {LINEAR_ATTENTION}")
            if not self.num_kv_layers:
                raise ConfigError("layer_types has no full_attention layer")
        if self.num_linear_layers:
            for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{name} must be positive for linear-attention layers, got {getattr(self, name)}")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ConfigError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                                  f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.rotary_dim < 0 or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"rotary dims ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def is_linear(self) -> tuple[bool, ...]:
        """Per layer: True for a linear-attention (Gated DeltaNet) layer."""
        return tuple(t == LINEAR_ATTENTION for t in self.layer_types) if self.layer_types \
            else (False,) * self.num_layers

    @property
    def num_linear_layers(self) -> int:
        return sum(self.is_linear)

    @property
    def num_kv_layers(self) -> int:
        """Layers with a paged KV cache (the full-attention ones)."""
        return self.num_layers - self.num_linear_layers

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, in the checkpoint's dtype's element size."""
        return self.num_kv_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of a linear layer's causal convolution (its q, k and v)."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim \
            + self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def state_bytes_per_sequence(self) -> int:
        """Bytes of recurrent state per sequence over the linear layers (conv and delta-rule states,
        both float32)."""
        conv = self.linear_conv_dim * (self.linear_conv_kernel_dim - 1)
        ssm = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
        return self.num_linear_layers * (conv + ssm) * 4

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise ConfigError(
                f"unsupported architectures {archs}; supported: {sorted(ARCHITECTURES)}")
        try:
            hidden = cfg["hidden_size"]
            layers = cfg["num_hidden_layers"]
            heads = cfg["num_attention_heads"]
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}") from None
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        if not num_experts:
            raise ConfigError("config.json names no experts (num_experts / num_local_experts)")
        if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
            raise ConfigError("sliding-window attention is not supported; set use_sliding_window false")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only silu)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported (only default)")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

        if family == "mixtral":
            moe_layers = tuple(True for _ in range(layers))
            norm_topk = True
        elif family == "qwen3_next" and not cfg.get("num_experts"):
            raise ConfigError("config.json names no experts (num_experts)")
        else:
            step = cfg.get("decoder_sparse_step", 1) or 1
            dense = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple((i not in dense) and (i + 1) % step == 0 for i in range(layers))
            norm_topk = bool(cfg.get("norm_topk_prob", False))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=cfg.get("intermediate_size", 0),
            moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg.get("intermediate_size"),
            num_experts=num_experts,
            top_k=cfg["num_experts_per_tok"],
            norm_topk_prob=norm_topk,
            moe_layers=moe_layers,
            shared_expert_intermediate_size=(
                cfg.get("shared_expert_intermediate_size", 0) if family in ("qwen2_moe", "qwen3_next") else 0),
            qk_norm=family in ("qwen3_moe", "qwen3_next"),
            qkv_bias=bool(cfg.get("qkv_bias", True)) if family == "qwen2_moe"
            else bool(cfg.get("attention_bias", False)),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype") or "float32",
            **(_qwen3_next_fields(cfg, layers, head_dim, rope) if family == "qwen3_next" else {}),
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir} is not a model directory: {path} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(data)


def _qwen3_next_fields(cfg: dict, layers: int, head_dim: int, rope: dict) -> dict:
    """The hybrid family's fields: its layer mix (an explicit `layer_types`, else every
    `full_attention_interval`-th layer full attention), gated attention with partial rotary, zero-centred
    norms, and the Gated DeltaNet layers' shapes."""
    types = cfg.get("layer_types")
    if types is None:
        interval = cfg.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval <= 0:
            raise ConfigError(f"full_attention_interval must be a positive integer, got {interval!r}")
        types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layers)]
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    rotary = int(head_dim * factor)
    return dict(layer_types=tuple(types), attn_output_gate=True, zero_centered_norm=True,
                rotary_dim=rotary - rotary % 2,
                linear_num_key_heads=cfg.get("linear_num_key_heads", 16),
                linear_num_value_heads=cfg.get("linear_num_value_heads", 32),
                linear_key_head_dim=cfg.get("linear_key_head_dim", 128),
                linear_value_head_dim=cfg.get("linear_value_head_dim", 128),
                linear_conv_kernel_dim=cfg.get("linear_conv_kernel_dim", 4))


def default_dtype() -> str:
    """bfloat16 where this machine multiplies it fast (CUDA, or a CPU with AVX512-BF16/AMX), else float32."""
    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


@dataclass
class EngineConfig:
    dtype: str = field(default_factory=default_dtype)
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the paged KV pool
    max_num_seqs: int = 256  # running sequences per step
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    prefix_namespace: str = ""  # salts block hashes (tenant, model fingerprint)
    device: str = "cpu"
    seed: int = 0
    # micro-batches in flight per step: 0 = auto (2 when experts are remote and on GPUs, so one
    # micro-batch's attention hides the other's expert round trip; else 1)
    micro_batches: int = 0
    # the model's operations: auto (cuda on a GPU, the C kernels on the CPU, else torch), torch (the
    # reference), cpu, cuda. MESH_NATIVE_KERNELS=0 makes auto keep a CPU engine on torch ops.
    backend: str = "auto"
    cpu_threads: int = 0  # threads per CPU kernel call; 0: MESH_NATIVE_THREADS, else torch's thread count
    # the CUDA backend's expert kernel: auto (the fastest measured here: triton), triton, grouped_mm
    moe_kernel: str = "auto"
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying CUDA graphs
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random weights made on the device
    # hybrid models: snapshot the recurrent state every this many KV blocks so cached prefixes of those
    # lengths restore it (0: no snapshots, hybrid prompts then never hit the prefix cache)
    state_snapshot_interval: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.micro_batches not in (0, 1, 2):
            raise ConfigError(f"micro_batches must be 0 (auto), 1 or 2, got {self.micro_batches}")
        choices = {"backend": ("auto", "torch", "cpu", "cuda"), "moe_kernel": ("auto", "triton", "grouped_mm"),
                   "load_format": ("auto", "dummy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.state_snapshot_interval < 0:
            raise ConfigError(f"state_snapshot_interval must be 0 (off) or positive, got {self.state_snapshot_interval}")
        if self.cpu_threads < 0:
            raise ConfigError(f"cpu_threads must be 0 (auto) or positive, got {self.cpu_threads}")
        if self.max_num_batched_tokens < self.block_size:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least the "
                f"block size ({self.block_size})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1048576' -> bytes."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    try:
        value = float(s) * mult
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size (e.g. 512M, 2G)") from None
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return int(value)
