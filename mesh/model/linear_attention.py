"""Gated DeltaNet, the linear-attention layers of the hybrid Qwen3-Next family, in torch ops.

Per value head the layer keeps a state S [d_k, d_v] (float32) and, per token t, with q and k
L2-normalised and q scaled by d_k^-1/2:

    S <- exp(g_t) * S                              decay (g_t <= 0)
    u_t = beta_t * (v_t - S^T k_t)                 the delta: what S does not yet predict, scaled
    S <- S + k_t u_t^T                             write
    o_t = S^T q_t                                  read

`recurrent` runs that token by token (decode: one token per sequence, many sequences at once).
`chunked` runs a prompt chunk of C tokens with matrix products: with a_t = exp(sum_{s<=t} g_s) the
decay from the chunk's start, the deltas satisfy a unit lower-triangular system

    u_s + beta_s * sum_{r<s} (a_s / a_r) (k_s . k_r) u_r = beta_s * (v_s - a_s S0^T k_s)

solved in one triangular solve, after which o_t = a_t S0^T q_t + sum_{s<=t} (a_t / a_s)(q_t . k_s) u_s
and the chunk's final state is a_C S0 + sum_s (a_C / a_s) k_s u_s^T. Chunks are cut where the caller
asks for the state (block boundaries of the paged cache, so prefix caching can snapshot it) and
otherwise every `CHUNK` tokens. Both forms compute the same function (to float32 rounding).

Before the rule, q, k and v pass through a causal depthwise convolution over time (kernel K) and
SiLU; its state is the last K-1 inputs of the sequence. After it, a gated RMSNorm: normalise, times
the weight, times silu(z).

`StatePool` holds every sequence's convolution and delta-rule states beside the paged KV pool, one
slot per running sequence, plus snapshot slots for prefix caching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per chunked step when no state is asked for inside a chunk


class StatePool:
    """Per linear layer: conv [S, conv_dim, K-1] and delta-rule [S, Hv, dk, dv] states, float32.

    Slots 0..num_slots-1 serve running sequences; `snapshot` slots (after them, same tensors) hold
    copies taken at block boundaries for the prefix cache."""

    def __init__(self, num_layers: int, num_slots: int, conv_dim: int, kernel: int, value_heads: int,
                 key_dim: int, value_dim: int, device: torch.device | str = "cpu"):
        self.num_layers, self.num_slots = num_layers, num_slots
        self.conv = torch.zeros(num_layers, num_slots, conv_dim, kernel - 1, dtype=torch.float32, device=device)
        self.ssm = torch.zeros(num_layers, num_slots, value_heads, key_dim, value_dim, dtype=torch.float32,
                               device=device)

    @staticmethod
    def bytes_per_slot(num_layers: int, conv_dim: int, kernel: int, value_heads: int, key_dim: int,
                       value_dim: int) -> int:
        return num_layers * (conv_dim * (kernel - 1) + value_heads * key_dim * value_dim) * 4

    def reset(self, slot: int) -> None:
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()

    def copy(self, src: int, dst: int) -> None:
        self.conv[:, dst].copy_(self.conv[:, src])
        self.ssm[:, dst].copy_(self.ssm[:, src])

    def read(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one slot's states over all layers (for another tier): conv, ssm."""
        return self.conv[:, slot].clone(), self.ssm[:, slot].clone()

    def write(self, slot: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv[:, slot].copy_(conv)
        self.ssm[:, slot].copy_(ssm)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, C] (one sequence's new tokens), weight [C, K], state [C, K-1] (the K-1 inputs before x)
    -> (silu(conv) [T, C] in x's dtype, the new state [C, K-1] float32)."""
    t = x.shape[0]
    k = weight.shape[1]
    xcat = torch.cat([state.to(x.dtype), x.t()], dim=1)  # [C, K-1+T]
    y = F.conv1d(xcat[None].to(weight.dtype), weight[:, None, :], groups=weight.shape[0])[0]  # [C, T]
    return F.silu(y).to(x.dtype).t(), xcat[:, t:t + k - 1].float()


def conv_states_at(x: torch.Tensor, state: torch.Tensor, ends: list[int]) -> list[torch.Tensor]:
    """The convolution state after the first e tokens of x [T, C], for each e in ends -> [C, K-1] each."""
    xcat = torch.cat([state.to(x.dtype), x.t()], dim=1)  # [C, K-1+T]
    km1 = state.shape[1]
    return [xcat[:, e:e + km1].float() for e in ends]


def conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence: x [B, C], state [B, C, K-1] -> (silu(conv) [B, C], new state [B, C, K-1])."""
    window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=2)  # [B, C, K]
    y = (window.to(weight.dtype) * weight[None]).sum(dim=2)  # [B, C]
    return F.silu(y).to(x.dtype), window[:, :, 1:].float()


def _prepare(q, k, v, g, beta, value_heads: int):
    """[T, H*, d] per-token inputs -> float32 [H, T, d] with q, k normalised, q scaled, k heads
    repeated to the value heads."""
    rep = value_heads // q.shape[1]
    q = l2_normalize(q.float())
    k = l2_normalize(k.float())
    q = q * q.shape[-1] ** -0.5
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    return (q.transpose(0, 1), k.transpose(0, 1), v.float().transpose(0, 1), g.float().t(), beta.float().t())


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, cuts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One sequence's chunk: q, k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv], state [Hv, dk, dv]
    -> (o [T, Hv, dv] float32, final state, [state after the first c tokens for c in cuts]).

    The chunk runs in pieces of `CHUNK` tokens whatever the cuts; a state asked for inside a piece is
    read off that piece's deltas (they do not depend on where the piece ends), so asking for a state
    every block costs a [dk, C] x [C, dv] product per cut, not a piece per block."""
    t = q.shape[0]
    qh, kh, vh, gh, bh = _prepare(q, k, v, g, beta, v.shape[1])  # [H, T, *]
    wanted = sorted({c for c in (cuts or []) if 0 < c <= t})
    out = torch.empty_like(vh)  # [H, T, dv]
    snaps, s = {}, state.float()
    for a in range(0, t, CHUNK):
        b = min(a + CHUNK, t)
        inner = [c - a for c in wanted if a < c < b]
        out[:, a:b], s, inner_states = _chunk(qh[:, a:b], kh[:, a:b], vh[:, a:b], gh[:, a:b], bh[:, a:b], s, inner)
        snaps.update({a + j: st for j, st in zip(inner, inner_states)})
        snaps[b] = s
    return out.transpose(0, 1), s, [snaps[c] if c in snaps else state.float() for c in (cuts or [])]


_MASKS: dict = {}


def _masks(c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal mask [C, C] (bool, diagonal included) and the identity [C, C], kept per size."""
    key = (c, device)
    if key not in _MASKS:
        _MASKS[key] = (torch.ones(c, c, dtype=torch.bool, device=device).tril(), torch.eye(c, device=device))
    return _MASKS[key]


def _chunk(q, k, v, g, beta, s0, inner: list[int] = ()):
    """One piece for all heads: q, k [H, C, dk], v [H, C, dv], g, beta [H, C], s0 [H, dk, dv]
    -> (o [H, C, dv], the state after the piece, [the state after the first j tokens for j in inner])."""
    c = q.shape[1]
    logd = g.cumsum(dim=1)  # [H, C] log a_t
    causal, eye = _masks(c, q.device)
    # decay between s and t (t >= s): a_t / a_s = exp(log a_t - log a_s); masked above the diagonal
    ratio = torch.where(causal, logd[:, :, None] - logd[:, None, :], float("-inf")).exp()  # [H, C, C]
    a = logd.exp()[..., None]  # [H, C, 1]
    kk = k @ k.transpose(1, 2)  # [H, C, C]
    system = eye + (beta[..., None] * ratio * kk).tril(-1)
    rhs = beta[..., None] * (v - a * (k @ s0))  # [H, C, dv]
    u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [H, C, dv]
    o = a * (q @ s0) + (ratio * (q @ k.transpose(1, 2))) @ u  # [H, C, dv]

    def state_after(j: int) -> torch.Tensor:
        back = (logd[:, j - 1:j] - logd[:, :j]).exp()[..., None]  # [H, j, 1]: a_j / a_s
        return a[:, j - 1:j] * s0 + (k[:, :j] * back).transpose(1, 2) @ u[:, :j]

    return o, state_after(c), [state_after(j) for j in inner]


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence: q, k [B, Hk, dk], v [B, Hv, dv], g, beta [B, Hv], state [B, Hv, dk, dv]
    -> (o [B, Hv, dv] float32, new state)."""
    rep = v.shape[1] // q.shape[1]
    q, k = l2_normalize(q.float()), l2_normalize(k.float())
    q = q * q.shape[-1] ** -0.5
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    s = state.float() * g.float().exp()[..., None, None]  # a new tensor: the caller's state is kept
    mem = (k[..., None, :] @ s).squeeze(-2)  # [B, Hv, dv]: S^T k
    u = (v.float() - mem) * beta.float()[..., None]
    s += k[..., :, None] * u[..., None, :]
    return (q[..., None, :] @ s).squeeze(-2), s


def gated_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """o, z [T, Hv, dv] (o in the model dtype) -> weight * norm(o) * silu(z), rounded as the reference:
    the normalised value to the model dtype, times the weight in that dtype, times silu(z) in float32."""
    dtype = o.dtype
    x = o.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return ((weight * normed) * F.silu(z.float())).to(dtype)
