"""Dense building blocks in torch ops, written to reproduce transformers' numerics operation for operation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers spells it. A weight in the model dtype (Qwen3-MoE, Qwen2-MoE, Mixtral):
    normalise in float32, cast back, then scale in the input dtype. A float32 weight (Qwen3-Next's
    zero-centred norms, loaded as 1 + w): scale in float32 and round once. (F.rms_norm computes
    x * rsqrt(mean(x^2) + eps) bit-identically to the five-op spelling.)"""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if weight.dtype == torch.float32:
        return (normed * weight).to(x.dtype)
    return weight * normed.to(x.dtype)


class RotaryTable:
    """cos/sin for every position up to `max_positions`, computed once in float32, stored in the model
    dtype as transformers applies them: [P, R], the two halves equal (rotate-half form), for the first
    R = rotary_dim dims of a head (all of them but in Qwen3-Next's partial rotary)."""

    def __init__(self, rotary_dim: int, theta: float, max_positions: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(dtype).to(device)
        self.sin = emb.sin().to(dtype).to(device)
        self.max_positions = max_positions

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, 1, R], to look up once per step and share across layers."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by its positions' cos, sin [T, 1, R] in its first R dims."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head = x[..., :r]
    return torch.cat((head * cos + _rotate_half(head) * sin, x[..., r:]), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2I] (gate || up) -> [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
