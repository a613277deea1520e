"""Per-family naming on disk. Everything else about a family is in `ModelConfig` flags
(q/k norm, qkv bias, shared expert, dense layers), so one decoder serves them all.

- qwen3_moe (Qwen3-Coder-30B-A3B, 480B-A35B): `model.layers.N.mlp.experts.E.{gate,up,down}_proj`,
  q/k RMSNorm, no qkv bias, router weights cast back to the model dtype.
- qwen2_moe: same names, qkv bias, plus `mlp.shared_expert.*` and `mlp.shared_expert_gate` (sigmoid).
- mixtral: `model.layers.N.block_sparse_moe.experts.E.w1/w3/w2` (gate/up/down), router weights kept
  in float32.
- qwen3_next (Qwen3-Coder-Next): Qwen2-MoE's names for the MoE block (shared expert and its gate);
  `self_attn.*` in the full-attention layers, `linear_attn.*` (in_proj_qkvz, in_proj_ba, conv1d,
  dt_bias, A_log, norm, out_proj) in the Gated DeltaNet layers; `mtp.*` (multi-token prediction)
  tensors are not read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    moe_prefix: str  # module name of the sparse block under model.layers.N
    gate: str  # per-expert projection names on disk
    up: str
    down: str
    router_weights_in_model_dtype: bool

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{proj}.weight"

    def fused_keys(self, layer: int) -> tuple[str, str]:
        """Checkpoints that store experts already stacked (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        base = f"model.layers.{layer}.{self.moe_prefix}.experts"
        return f"{base}.gate_up_proj", f"{base}.down_proj"

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.gate.weight"


_QWEN = FamilySpec("mlp", "gate_proj", "up_proj", "down_proj", router_weights_in_model_dtype=True)
FAMILIES = {
    "qwen3_moe": _QWEN,
    "qwen2_moe": _QWEN,
    "mixtral": FamilySpec("block_sparse_moe", "w1", "w3", "w2", router_weights_in_model_dtype=False),
    "qwen3_next": _QWEN,
}
