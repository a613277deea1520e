"""Fused Mixture-of-Experts experts in Triton: align, two grouped GEMMs, combine.

The layer computes, for every token t and each of its top-k choices k with expert e = topk_ids[t, k],

    out[t] = sum_k topk_weights[t, k] * W_down[e] @ (silu(W_gate[e] @ x_t) * (W_up[e] @ x_t))

with the weights in their checkpoint layout: w_gate_up [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up) and
w_down [E, H, I], each row one output feature, the reduction dimension contiguous.

Pipeline (four or five launches, none of which waits on the host):

1. `moe_align` groups the T*K (token, k) pairs by expert. Each expert's pairs take a run of
   `sorted_ids` padded up to a multiple of BLOCK_M, so every block of BLOCK_M consecutive positions
   belongs to one expert (`block_expert`). Padding holds the sentinel T*K. Every output shape comes
   from host integers (the worst case, every expert padded by BLOCK_M - 1), so a CUDA graph can
   capture it; the true padded length is a device scalar the GEMMs read to skip the tail. Within an
   expert, pairs keep their flat order, so the layout is deterministic.
2. The gate/up GEMM: one program per (block, tile of BLOCK_N intermediate columns). It gathers its
   rows of hidden through `sorted_ids` (row = pair // K; hidden is never copied per pair), streams
   the matching BLOCK_N gate rows and BLOCK_N up rows of its expert's weights along the contiguous H
   dimension, and applies silu(gate) * up to the two float32 accumulators in the epilogue. The
   result is rounded once to the model dtype into `act` [max_padded, I], indexed by sorted position,
   so the next GEMM reads its A rows contiguously.
3. The down GEMM: one program per (block, tile of BLOCK_N hidden columns), reading `act` and the
   expert's w_down rows along the contiguous I dimension. The epilogue scales each row by its
   top-k weight in float32 and scatters it to its pair's row of `pair_out` [T*K, H] (model dtype).
4. The combine sums each token's K pair rows in float32 and rounds once, in a fixed order: no
   atomics, so the result is bit-for-bit reproducible. It reads topk_ids to skip pairs whose expert
   is outside [0, E), which nothing wrote. With K == 1 (the grouped entry point) the down GEMM
   writes the zeroed output directly and there is no combine.

Decode is memory bound: a step must read every active expert's weights once. A block touches its
expert's weights once per tile, so with one block per expert the weights cross HBM once per layer.
Small-T configs use BLOCK_M 16 and narrow BLOCK_N so that enough programs exist to fill the chip
while each reads long contiguous runs of the weight rows; large-T configs use 64/128-row blocks for
tensor-core efficiency. Tile sizes are data (`get_config`): tuned JSON tables where someone ran
`scripts/tune_moe.py` on the device, else the heuristic in `_heuristic_config`.

`grouped_mm_experts` is the same function built on torch's `F.grouped_mm`, the library baseline.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CONFIG_DIR = Path(__file__).resolve().parent / "moe_configs"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# Keys a config's optional "down" entry may override for the down GEMM (BLOCK_M is shared: both
# GEMMs walk the same aligned blocks).
DOWN_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

# The align kernel counts pairs in one launch (each program counting all pairs itself) while that
# redundant count stays this small: pairs x expert bins. Past it, a separate count kernel splits the
# counting across programs and the align kernel adds up their per-chunk counts.
_FUSED_COUNT_LIMIT = 1 << 17
# Elements of one [SUB, NB] one-hot tile in the align kernels (a few registers per thread).
_ONEHOT_ELEMS = 8192
# Programs of the split count: enough to spread 8192 x 10 pairs, few enough that each align
# program's walk over the per-chunk counts stays short.
_MAX_COUNT_PROGRAMS = 128


# ---------------------------------------------------------------------------------------------
# moe_align
# ---------------------------------------------------------------------------------------------

@triton.jit
def _onehot(ids_ptr, offs, num_pairs, num_experts, bins):
    """[SUB] pair indices -> [SUB, NB] int32, 1 where the pair's expert is that bin (0 for pairs
    past the end or with an expert id outside [0, num_experts))."""
    ok = offs < num_pairs
    e = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)  # [SUB]
    ok = ok & (e >= 0) & (e < num_experts)
    return ((e[:, None] == bins[None, :]) & ok[:, None]).to(tl.int32)  # [SUB, NB]


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts, chunk,
                  NB: tl.constexpr, SUB: tl.constexpr):
    """counts[c, e] = pairs of chunk c (flat indices [c*chunk, (c+1)*chunk)) routed to expert e."""
    c = tl.program_id(0)
    bins = tl.arange(0, NB)
    cnt = tl.zeros([NB], dtype=tl.int32)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, num_pairs)
    for p0 in range(lo, hi, SUB):
        cnt += tl.sum(_onehot(ids_ptr, p0 + tl.arange(0, SUB), num_pairs, num_experts, bins), axis=0)
    tl.store(counts_ptr + c * NB + bins, cnt)


@triton.jit
def _align_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                  num_pairs, num_experts, chunk, num_chunks, max_padded, max_blocks, blocks_per_prog,
                  BLOCK_M: tl.constexpr, NB: tl.constexpr, SUB: tl.constexpr, BB: tl.constexpr,
                  FUSED_COUNT: tl.constexpr):
    """Program c places the pairs of its chunk and fills its share of the blocks.

    Expert e owns sorted positions [start[e], end[e]), its count rounded up to BLOCK_M. A pair's
    position is start[e] + (pairs of e in earlier chunks) + (pairs of e earlier in this chunk). The
    per-expert lookups are one-hot reductions over the NB expert bins: register tensors cannot be
    indexed, and a bin count of at most 512 keeps them cheap.
    """
    c = tl.program_id(0)
    bins = tl.arange(0, NB)
    total = tl.zeros([NB], dtype=tl.int32)  # pairs per expert, all chunks
    before = tl.zeros([NB], dtype=tl.int32)  # pairs per expert in chunks before c
    if FUSED_COUNT:
        # chunk is a multiple of SUB, so each sub-block lies wholly before, in or after chunk c
        for p0 in range(0, num_pairs, SUB):
            cnt = tl.sum(_onehot(ids_ptr, p0 + tl.arange(0, SUB), num_pairs, num_experts, bins), axis=0)
            total += cnt
            before += tl.where(p0 < c * chunk, cnt, 0)
    else:
        for p in range(0, num_chunks):
            cnt = tl.load(counts_ptr + p * NB + bins)
            total += cnt
            before += tl.where(p < c, cnt, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [NB]
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    if c == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    # This chunk's pairs, in flat order within each expert.
    run = start + before  # [NB] next free position of each expert
    lo = c * chunk
    hi = tl.minimum(lo + chunk, num_pairs)
    for p0 in range(lo, hi, SUB):
        offs = p0 + tl.arange(0, SUB)  # [SUB]
        hot = _onehot(ids_ptr, offs, num_pairs, num_experts, bins)  # [SUB, NB]
        earlier = tl.cumsum(hot, axis=0) - hot  # same-expert pairs before each one in this tile
        pos = tl.sum(hot * (earlier + run[None, :]), axis=1)  # [SUB]
        tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=tl.sum(hot, axis=1) > 0)
        run += tl.sum(hot, axis=0)

    # This program's blocks: their expert, and the sentinel in their padding positions (disjoint
    # from every position a pair took above, so programs never write the same element).
    b_lo = c * blocks_per_prog
    b_hi = tl.minimum(b_lo + blocks_per_prog, max_blocks)
    for b0 in range(b_lo, b_hi, BB):
        b = b0 + tl.arange(0, BB)  # [BB]
        first = b * BLOCK_M  # [BB]
        inside = ((start[None, :] <= first[:, None]) & (first[:, None] < end[None, :])).to(tl.int32)  # [BB, NB]
        owned = tl.sum(inside, axis=1) > 0  # blocks past num_padded have no expert
        expert = tl.where(owned, tl.sum(inside * bins[None, :], axis=1), -1)
        fill_from = tl.where(owned, tl.sum(inside * (start + total)[None, :], axis=1), first)
        b_ok = b < b_hi
        tl.store(block_expert_ptr + b, expert, mask=b_ok)
        pos = first[:, None] + tl.arange(0, BLOCK_M)[None, :]  # [BB, BLOCK_M]
        pad = (pos >= fill_from[:, None]) & (pos < max_padded) & b_ok[:, None]
        tl.store(sorted_ptr + pos, tl.zeros([BB, BLOCK_M], dtype=tl.int32) + num_pairs, mask=pad)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case aligned length: every expert's run padded by block_m - 1."""
    return num_pairs + num_experts * (block_m - 1)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *,
              _fused_count: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] (int32/int64) -> (sorted_ids [max_padded] int32, block_expert [max_blocks]
    int32, num_padded [1] int32), all on topk_ids' device, without waiting on it.

    sorted_ids lists the flat pair indices t*K + k grouped by expert in increasing expert order,
    each expert's run padded to a multiple of block_m with the sentinel T*K (positions past
    num_padded hold the sentinel too). block_expert[b] is the expert of positions
    [b*block_m, (b+1)*block_m), -1 for blocks past num_padded. Pairs whose id is < 0 or >=
    num_experts appear nowhere. max_padded = T*K + num_experts*(block_m-1), max_blocks =
    cdiv(max_padded, block_m). `_fused_count` forces the one- or two-launch variant (tests).
    """
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    ids = topk_ids.reshape(-1).contiguous()  # [T*K]
    max_padded = max_padded_rows(num_pairs, num_experts, block_m)
    max_blocks = triton.cdiv(max_padded, block_m)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)

    nb = max(16, triton.next_power_of_2(num_experts))
    sub = max(16, min(256, _ONEHOT_ELEMS // nb))
    fused = num_pairs * nb <= _FUSED_COUNT_LIMIT if _fused_count is None else _fused_count
    if fused:
        # One launch. Each program counts every pair, so more programs only share the placing and
        # the block fill: a few hundred pairs each.
        chunk = sub * triton.cdiv(128, sub)
    else:
        chunk = sub * max(1, triton.cdiv(triton.cdiv(num_pairs, _MAX_COUNT_PROGRAMS), sub))
    num_chunks = max(1, triton.cdiv(num_pairs, chunk))
    counts = sorted_ids  # unused placeholder pointer when counting is fused
    if not fused:
        counts = torch.empty(num_chunks, nb, dtype=torch.int32, device=device)
        _count_kernel[(num_chunks,)](ids, counts, num_pairs, num_experts, chunk, NB=nb, SUB=sub)
    _align_kernel[(num_chunks,)](
        ids, counts, sorted_ids, block_expert, num_padded,
        num_pairs, num_experts, chunk, num_chunks, max_padded, max_blocks, triton.cdiv(max_blocks, num_chunks),
        BLOCK_M=block_m, NB=nb, SUB=sub, BB=max(1, min(16, 2048 // nb)),
        FUSED_COUNT=fused, num_warps=4)
    return sorted_ids, block_expert, num_padded


# ---------------------------------------------------------------------------------------------
# The two grouped GEMMs and the combine
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_ids(num_m_blocks, num_n_tiles, GROUP_M: tl.constexpr):
    """Program id -> (m block, n tile), GROUP_M blocks walked together per n tile so that, in
    prefill where an expert owns many consecutive blocks, programs running together share weight
    tiles in L2. Unused blocks (past num_padded) come last either way."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                    inter, hidden, num_pairs, top_k, num_m_blocks,
                    stride_xm, stride_we, stride_wn, stride_am,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """act[pos, n] = silu(x[row] . w[e, n]) * (x[row] . w[e, inter + n]) for the block's positions,
    row = sorted_ids[pos] // top_k; rounded once to act's dtype. Padding rows compute zeros."""
    pid_m, pid_n = _tile_ids(num_m_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] sorted positions, all < num_padded
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    row = tl.where(row_ok, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past inter wrap onto valid rows (their results are never stored): unmasked weight
    # loads stay wide.
    offs_wn = offs_n % inter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + row[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    # [BK, BN] views of the gate and up rows, k contiguous as stored
    g_ptrs = w_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < hidden - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, float32
    out_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=(offs_n < inter)[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                 hidden, inter, num_pairs, num_m_blocks,
                 stride_am, stride_we, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                 HAS_WEIGHTS: tl.constexpr):
    """out[pair, n] = weight[pair] * (act[pos] . w[e, n]) for the block's real pairs (pair =
    sorted_ids[pos]); weight 1 without HAS_WEIGHTS. Padding rows are not stored."""
    pid_m, pid_n = _tile_ids(num_m_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % hidden
    offs_k = tl.arange(0, BLOCK_K)
    # act rows are in sorted order: a contiguous [BM, inter] slab, no gather
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = w_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
        acc = acc * w[:, None]
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < hidden)[None, :])


@triton.jit
def _combine_kernel(pair_ptr, ids_ptr, out_ptr, hidden, top_k, num_experts, stride_om,
                    K_POW2: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over k of pair rows t*K + k whose expert is in [0, E), in float32, k in order."""
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    ks = tl.arange(0, K_POW2)
    e = tl.load(ids_ptr + t * top_k + ks, mask=ks < top_k, other=-1)
    k_ok = (ks < top_k) & (e >= 0) & (e < num_experts)  # [KP]
    h_ok = offs_h < hidden
    rows = (t * top_k + ks).to(tl.int64)
    x = tl.load(pair_ptr + rows[:, None] * hidden + offs_h[None, :], mask=k_ok[:, None] & h_ok[None, :],
                other=0.0)  # [KP, BH]
    tl.store(out_ptr + t.to(tl.int64) * stride_om + offs_h, tl.sum(x.to(tl.float32), axis=0).to(out_ptr.dtype.element_ty),
             mask=h_ok)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _check_shapes(hidden, w_gate_up, w_down, topk_ids) -> tuple[int, int, int, int, int]:
    t, h = hidden.shape
    e, two_i, h2 = w_gate_up.shape
    i = two_i // 2
    if h2 != h or two_i != 2 * i or tuple(w_down.shape) != (e, h, i):
        raise ValueError(f"shapes do not match: hidden {tuple(hidden.shape)}, w_gate_up "
                         f"{tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(f"topk_ids must be [T, K] with T = {t}, got {tuple(topk_ids.shape)}")
    if hidden.dtype != w_gate_up.dtype or hidden.dtype != w_down.dtype:
        raise ValueError(f"dtypes differ: hidden {hidden.dtype}, weights {w_gate_up.dtype}/{w_down.dtype}")
    return t, h, e, i, topk_ids.shape[1]


def _gemm_params(config: dict) -> tuple[dict, dict]:
    """A config dict -> (gate/up GEMM params, down GEMM params)."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"MoE config lacks {missing}: {config}")
    up = {k: int(config[k]) for k in CONFIG_KEYS}
    down = dict(up)
    down.update({k: int(v) for k, v in config.get("down", {}).items() if k in DOWN_KEYS})
    for p in (up, down):
        if min(p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_K"]) < 16:
            raise ValueError(f"tl.dot needs every block dimension >= 16: {config}")
    return up, down


def fused_experts(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor | None, *,
                  config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], topk_ids [T, K] int, topk_weights
    [T, K] (float32 or the model dtype; None means 1) -> [T, H] in hidden.dtype (written into
    `out` when given).

    out[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, k];
    pairs with e outside [0, E) contribute nothing. float32 accumulation throughout; the activation
    is rounded once to the model dtype, each weighted pair row once, and the sum over k once. No
    host synchronisation: the call can be captured in a CUDA graph.
    """
    t, h, e, i, k = _check_shapes(hidden, w_gate_up, w_down, topk_ids)
    if out is None:
        out = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    if t == 0:
        return out
    if config is None:
        config = get_config(e, i, h, t, k, hidden.dtype, _device_name(hidden.device))
    up_p, down_p = _gemm_params(config)
    block_m = up_p["BLOCK_M"]
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    w_gate_up = w_gate_up if w_gate_up.stride(2) == 1 else w_gate_up.contiguous()
    w_down = w_down if w_down.stride(2) == 1 else w_down.contiguous()
    ieee = hidden.dtype == torch.float32

    sorted_ids, block_expert, num_padded = moe_align(topk_ids, e, block_m)
    max_padded, max_blocks = sorted_ids.numel(), block_expert.numel()
    act = torch.empty(max_padded, i, dtype=hidden.dtype, device=hidden.device)  # [max_padded, I]
    _gate_up_kernel[(max_blocks * triton.cdiv(i, up_p["BLOCK_N"]),)](
        hidden, w_gate_up, act, sorted_ids, block_expert, num_padded,
        i, h, t * k, k, max_blocks,
        hidden.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0),
        BLOCK_M=block_m, BLOCK_N=up_p["BLOCK_N"], BLOCK_K=up_p["BLOCK_K"], GROUP_M=up_p["GROUP_M"],
        EVEN_K=h % up_p["BLOCK_K"] == 0, IEEE=ieee,
        num_warps=up_p["num_warps"], num_stages=up_p["num_stages"])

    weights = topk_weights.reshape(-1).contiguous() if topk_weights is not None else None  # [T*K]
    if k == 1:
        # One pair per token: pair rows are the output rows. Zeroed first, for pairs routed nowhere.
        out.zero_()
        pair_out = out
    else:
        pair_out = torch.empty(t * k, h, dtype=hidden.dtype, device=hidden.device)  # [T*K, H]
    _down_kernel[(max_blocks * triton.cdiv(h, down_p["BLOCK_N"]),)](
        act, w_down, pair_out, weights if weights is not None else act, sorted_ids, block_expert, num_padded,
        h, i, t * k, max_blocks,
        act.stride(0), w_down.stride(0), w_down.stride(1), pair_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=down_p["BLOCK_N"], BLOCK_K=down_p["BLOCK_K"], GROUP_M=down_p["GROUP_M"],
        EVEN_K=i % down_p["BLOCK_K"] == 0, IEEE=ieee, HAS_WEIGHTS=weights is not None,
        num_warps=down_p["num_warps"], num_stages=down_p["num_stages"])
    if k > 1:
        block_h = min(1024, triton.next_power_of_2(h))
        _combine_kernel[(t, triton.cdiv(h, block_h))](
            pair_out, topk_ids.contiguous(), out, h, k, e, out.stride(0),
            K_POW2=triton.next_power_of_2(k), BLOCK_H=block_h, num_warps=4)
    return out


def grouped_experts(rows: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                    slot_of_row: torch.Tensor, *, config: dict | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """rows [N, H], w_gate_up [S, 2I, H], w_down [S, H, I], slot_of_row [N] int -> [N, H].

    The expert-parallel worker's form: row r goes through local expert slot_of_row[r], unweighted,
    outputs in row order (rows need not be sorted). Rows whose slot is outside [0, S) come out
    zero. fused_experts with K = 1 and no weights; no host synchronisation.
    """
    return fused_experts(rows, w_gate_up, w_down, slot_of_row.reshape(-1, 1), None, config=config, out=out)


def grouped_mm_experts(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                       topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                       config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """fused_experts' signature and result through torch's grouped GEMM (`F.grouped_mm`), the
    library baseline: bfloat16 on CUDA devices that support it (sm90 for the fast kernel).

    The pairs are sorted by expert on the device (ids outside [0, E) sort last, past the final
    offset, where grouped_mm leaves its output undefined; they are masked out of the combine). The
    offsets are each expert's end row, from searchsorted over the sorted ids: no bincount, no host
    sync. `config` is accepted for signature compatibility and ignored.
    """
    t, h, e, i, k = _check_shapes(hidden, w_gate_up, w_down, topk_ids)
    if out is None:
        out = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    if t == 0:
        return out
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    flat = topk_ids.reshape(-1)  # [T*K]
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, e)
    order = torch.argsort(key, stable=True)  # [T*K] pair index at each sorted position
    offs = torch.searchsorted(key[order], torch.arange(e, device=flat.device, dtype=key.dtype),
                              right=True).to(torch.int32)  # [E] end of each expert's rows
    x = hidden.index_select(0, order // k)  # [T*K, H]
    # mat_b is [G, K, N]: the weights' transposed views, column-major as the kernel wants them
    gate_up = grouped_mm(x, w_gate_up.transpose(1, 2), offs=offs)  # [T*K, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    act = (F.silu(gate.float()) * up.float()).to(hidden.dtype)  # [T*K, I]
    y = grouped_mm(act, w_down.transpose(1, 2), offs=offs)  # [T*K, H], sorted order
    per_pair = torch.empty_like(y).index_copy_(0, order, y).view(t, k, h)  # [T, K, H]
    w = torch.where(valid, topk_weights.reshape(-1).float(), 0.0).view(t, k, 1)  # [T, K, 1]
    # rows routed nowhere hold whatever grouped_mm left there (maybe NaN): select, don't multiply
    summed = torch.where(valid.view(t, k, 1), per_pair.float() * w, 0.0).sum(dim=1)  # [T, H]
    out.copy_(summed)
    return out


# ---------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_file_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device_name: str) -> str:
    """The JSON table's name for one shape, dtype and device (spaces in the device name become _)."""
    return f"E={num_experts},I={inter},H={hidden},dtype={_dtype_name(dtype)},device={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict[int, dict] | None:
    p = Path(path)
    if not p.is_file():
        return None
    with open(p) as f:
        raw = json.load(f)
    return {int(tokens): cfg for tokens, cfg in raw.items()}


def get_config(num_experts: int, inter: int, hidden: int, num_tokens: int, top_k: int,
               dtype: torch.dtype, device_name: str, *, config_dir: str | Path | None = None) -> dict:
    """Tile sizes for fused_experts: dict(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages),
    used by both GEMMs, plus optionally "down": {subset of BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages} overriding them for the down GEMM.

    From `config_dir` (default moe_configs/ beside this file) the table named by config_file_name
    maps token counts to configs; the entry whose count is nearest num_tokens (ties: the smaller)
    is used. Without a table, `_heuristic_config`.
    """
    directory = Path(config_dir) if config_dir is not None else CONFIG_DIR
    table = _load_table(str(directory / config_file_name(num_experts, inter, hidden, dtype, device_name)))
    if table:
        bucket = min(table, key=lambda n: (abs(n - num_tokens), n))
        return dict(table[bucket])
    return _heuristic_config(num_experts, inter, hidden, num_tokens, top_k, dtype)


def _heuristic_config(num_experts: int, inter: int, hidden: int, num_tokens: int, top_k: int,
                      dtype: torch.dtype) -> dict:
    """Defaults for shapes without a table, from the shape of the work.

    BLOCK_M follows the average rows per expert (T*K/E). Up to 16 (decode) a block holds one
    expert's few rows and streams that expert's weights once, so the kernel is bound by HBM: it
    needs many programs, each reading long contiguous runs of weight rows. BLOCK_N 32 for gate/up
    (64 weight rows per program with the up rows) and 64 for down give thousands of programs for
    132 SMs when every expert is active; BLOCK_K 128 (256 bytes of a bf16 row per load) and 4
    stages keep several loads in flight per program. With more rows per expert the work turns
    compute bound and 64/128-row blocks with 128-wide weight tiles (gate and up together in the
    first GEMM) use the tensor cores better. float32 tiles take twice the shared memory per
    element, so their K tile is halved.

    One run of scripts/tune_moe.py --dry-run on an H200 (E=128, I=768, H=2048, K=8, bf16; CUDA
    graph replays, median) checked these picks against the candidates: this config was within 2%
    of the best at T=1 (41.6 vs 41.1 us) and T=64 (304 vs 303 us, ~4 TB/s of weight traffic), 64-row
    blocks beat 32-row ones at T=512 (334 vs 359 us best of each), and 128-row blocks were within 4%
    of the best at T=4096 (926 vs 892 us). No table was written from it: one run is not a tuning.
    """
    rows_per_expert = num_tokens * top_k / max(1, num_experts)
    wide = dtype == torch.float32
    if rows_per_expert <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4,
                   down=dict(BLOCK_N=64))
    elif rows_per_expert <= 160:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3,
                   down=dict(BLOCK_N=128))
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                   down=dict(BLOCK_N=128))
    if wide:
        cfg["BLOCK_K"] = max(32, cfg["BLOCK_K"] // 2)
        cfg["num_stages"] = min(cfg["num_stages"], 3)
    return cfg


def configs_to_try(num_tokens: int, top_k: int, num_experts: int) -> list[dict]:
    """Candidate configs for tuning one token count: 10 to 20 of them, pruned by rows per expert.

    Only the two block heights that matter at this count are tried: the largest two of 16/32/64/
    128 not above twice the average rows per expert (a block much taller than an expert's rows
    computes padding). Short blocks get the narrow-N, long-K shapes of the memory-bound decode
    regime; tall blocks the square tensor-core tiles. The down GEMM gets twice the N tile (capped
    at 128): the same number of weight rows per program as the gate/up GEMM reads (gate + up).
    Shapes whose pipelined bf16 tiles exceed ~200 KB of shared memory are dropped.
    """
    rows_per_expert = num_tokens * top_k / max(1, num_experts)
    heights = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)][-2:]
    shapes = {  # BLOCK_M -> (BLOCK_N options, BLOCK_K options, num_stages options, num_warps options)
        16: ((16, 32, 64), (128, 256), (3, 5), (4,)),
        32: ((32, 64), (64, 128), (3, 4), (4,)),
        64: ((64, 128), (64, 128), (3, 4), (4, 8)),
        128: ((64, 128), (64,), (3, 4), (4, 8)),
    }
    out = []
    for bm in heights:
        ns, ks, stages_opts, warp_opts = shapes[bm]
        for bn in ns:
            for bk in ks:
                for stages in stages_opts:
                    for warps in warp_opts:
                        if stages * 2 * (bm * bk + 2 * bn * bk) > 200 * 1024:
                            continue
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if bm == 16 else 8,
                                        num_warps=warps, num_stages=stages, down=dict(BLOCK_N=min(128, 2 * bn))))
    return out


def tile_flops_bytes(num_tokens: int, top_k: int, num_experts: int, inter: int, hidden: int,
                     elem_bytes: int) -> tuple[float, float]:
    """(FLOPs, fewest HBM bytes) of one layer: the expert weights touched (all experts once T*K
    covers them, as decode batches do) plus activations in and out. For the tuner's table."""
    pairs = num_tokens * top_k
    flops = 2.0 * pairs * 3 * inter * hidden
    touched = min(num_experts, pairs)
    weight_bytes = touched * 3 * inter * hidden * elem_bytes
    act_bytes = (2 * num_tokens * hidden + pairs * (inter + hidden) * 2) * elem_bytes
    return flops, float(weight_bytes + act_bytes)


__all__ = ["moe_align", "fused_experts", "grouped_experts", "grouped_mm_experts", "get_config",
           "configs_to_try", "config_file_name", "max_padded_rows", "CONFIG_DIR", "CONFIG_KEYS", "DOWN_KEYS",
           "tile_flops_bytes"]
