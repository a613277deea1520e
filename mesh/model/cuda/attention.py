"""Paged attention for the CUDA backend: three Triton kernels over the paged KV cache.

Layouts
-------
One layer's cache is a pair `k_cache, v_cache: [Hk, num_blocks, block_size, D]`, each a strided view
into the engine's pool `[L, 2, Hk, N, bs, D]`; only the head dimension D is required to have unit
stride, every other stride is passed to the kernels. A token lives at a flat slot
`s = block * block_size + offset`; a sequence's block table lists its blocks in token order, so its
token n sits in block `table[n // bs]` at offset `n % bs`. The kernels read K and V through the table
one token row at a time (a row is D contiguous elements), never gathering a sequence into a copy.
Query heads come in groups: with Hq = G * Hk, query head h reads kv head h // G.

qkv_norm_rope_write
-------------------
The projection's output row `[q heads | k heads | v heads]` of a token is handled one head at a time
by a program that takes that head for 16 tokens: q heads are RMS-normalised (optional), rotated and
written to q; k heads likewise and written to their cache slots; v heads are copied to their slots. Rotation is rotate-half over the first R dims: dim d < R/2
pairs with d + R/2, so each program loads its head twice, once straight and once with the pair index,
and needs no shuffle inside the vector. A negative slot (a padding row of a captured batch) writes
nothing to the cache.

Decode and split-K
------------------
One program owns (sequence, kv head, split). Its G query heads form the rows of a [16+, D] tile, so a
K or V tile fetched once serves all of them: decode is bound by reading K/V, and this reads each byte
once per step. With only a few sequences there are too few (sequence, kv head) pairs to occupy the GPU,
so the context is also cut into `num_splits` pieces, each a whole number of key tiles. Every piece keeps
its running maximum m, denominator l and unnormalised accumulator acc (the online softmax, in base 2
with log2(e) folded into the scale); a second kernel rescales the pieces to their common maximum and
adds them up. With one split the first kernel normalises and writes the output itself. Grid and scratch
sizes depend only on (B, Hk, num_splits), and each program reads its context length on the device, so
a captured graph stays valid when lengths and tables change between replays.

Prefill and the causal offset
-----------------------------
A chunk of n new tokens of a sequence whose cache holds ctx tokens (those n included, written by
qkv_norm_rope_write beforehand) places its query j at absolute position p = ctx - n + j; it sees keys
0..p. A program owns (kv head, query tile). The G heads of that kv head are folded into the rows: row r
is token q0 + r // G, head r % G, so one K/V tile is shared by all heads of the group, as in decode, and
a short chunk (a single token, say) still fills the rows with its heads instead of leaving them empty.
Keys up to the tile's first position are visible to every row, so those key tiles run without a mask;
only the tiles between that position and the tile's last position carry the causal mask, and keys past
the last position are never visited. The host lists the (chunk, first token) pairs of all tiles, longest
key range first so the long tiles start early.

Numerics: scores and softmax in float32; the probabilities are cast to the value dtype before P @ V, as
flash attention does; accumulation in float32. Float32 inputs use IEEE dots (tf32 is not accurate enough
for float32 tolerances). A row with no keys (context length 0) produces zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: a row that has seen no key keeps it, and exp2 of the
# difference of two such values is 1, not NaN.
NEG_BIG = tl.constexpr(-1.0e30)

# Decode split heuristic. Each (sequence, kv head, split) is one program; aim for a few programs per
# SM so that enough loads are in flight to reach HBM bandwidth, but never cut a context into pieces of
# fewer than MIN_SPLIT_TOKENS keys (each piece pays its q load and its partial write). Measured on an
# H200 (Hk 4, D 128, bf16): one sequence of 32K keys took 46 us in 32 pieces and 39.5 in 64 (128 was
# slower again); at 4K keys, 32 pieces of 128 keys beat 64 of 64; from 16 (sequence, kv head) pairs up
# the count this gives was within 3% of the best one tried.
DECODE_PROGRAMS_PER_SM = 3
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64
# Tokens per program of the q/k/v kernel.
QKV_TOKENS_PER_PROGRAM = 16


class DecodeConfig(NamedTuple):
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


class PrefillConfig(NamedTuple):
    block_m: int  # rows per tile: (tokens per tile) x G heads, padded
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Tile shape for decode on Hopper. K and V tiles of 64 x 128 bf16 are 16 KB each; three stages
    keep ~100 KB of loads in flight per program, which is what a memory-bound loop needs. On an H200
    128-key tiles were up to 20% faster when few programs run (one sequence, many splits) but 10%
    slower at batch 64, where bandwidth is what counts."""
    if dtype == torch.float32:
        return DecodeConfig(32 if head_dim <= 128 else 16, 4, 2)
    return DecodeConfig(64 if head_dim <= 128 else 32, 4, 3)


def prefill_config(head_dim: int, group: int, dtype: torch.dtype) -> PrefillConfig:
    """Tile shape for prefill on Hopper. 64 rows x 64 keys, 4 warps, 3 stages at D <= 128 in bf16: on an
    H200 at Qwen3-Coder shapes it beat 128 x 64 tiles with 8 warps on long cached prefixes (2048 new
    over 8192: 353 vs 304 TFLOP/s) and on short chunks (8 x 64 tokens: 215 vs 184); of four shapes tried
    it was within 6% of the best elsewhere, except 4 chunks of 512 (162 vs 195 with 128 x 32). Wider
    heads and float32 halve the key tile to stay in registers (not measured)."""
    if dtype == torch.float32:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    elif head_dim > 128:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 64, 4, 3
    return PrefillConfig(max(block_m, triton.next_power_of_2(group)), block_n, warps, stages)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is Triton's default, unused for 16-bit


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} for head_dim {head_dim}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need unit stride along head_dim")
    bs = k_cache.shape[2]
    if bs & (bs - 1):
        raise ValueError(f"block_size {bs} is not a power of two")


def _check_query(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Checks q [*, Hq, D] against the caches; returns (kv heads, block size)."""
    hq, d = q.shape[1], q.shape[2]
    _check_head_dim(d)
    _check_cache(k_cache, v_cache, d)
    hk, _, bs, _ = k_cache.shape
    if hq % hk:
        raise ValueError(f"{hq} query heads over {hk} kv heads")
    if q.dtype != k_cache.dtype or q.stride(2) != 1:
        raise ValueError(f"q {q.dtype} (stride {q.stride()}) against cache {k_cache.dtype}")
    return hk, bs


def _check_head_dim(d: int) -> None:
    # tl.dot needs every dimension >= 16, and tl.arange a power of two.
    assert d >= 16 and d & (d - 1) == 0, f"head_dim {d} must be a power of two >= 16"


# --------------------------------------------------------------------------------------------------
# q/k norm + rotary + cache write
# --------------------------------------------------------------------------------------------------

@triton.jit
def _norm_rope_head(src, offs, pair, mask, w_ptr, cos_rows, sin_rows, eps,
                    D: tl.constexpr, R: tl.constexpr, HAS_NORM: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """One q or k head of BLOCK_T tokens: float32 values of (optionally) normed and rotated x, rounded
    like the torch reference: the norm rounds to the model dtype before and after the weight, the
    rotation rounds each product and the sum. src, cos_rows, sin_rows: [BLOCK_T, 1] row pointers."""
    x = tl.load(src + offs[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
    xp = tl.load(src + pair[None, :], mask=mask, other=0.0).to(tl.float32)  # the rotate-half partners
    if HAS_NORM:
        # correctly rounded sqrt and divide (the fast ones are off by an ulp or two)
        inv = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps))[:, None]  # [BLOCK_T, 1]
        w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + pair, mask=offs < D, other=0.0).to(tl.float32)[None, :]
        x = ((x * inv).to(OUT_DTYPE).to(tl.float32) * w).to(OUT_DTYPE).to(tl.float32)
        xp = ((xp * inv).to(OUT_DTYPE).to(tl.float32) * wp).to(OUT_DTYPE).to(tl.float32)
    rot_mask = mask & (offs < R)[None, :]
    cos = tl.load(cos_rows + offs[None, :], mask=rot_mask, other=1.0).to(tl.float32)
    sin = tl.load(sin_rows + offs[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x[R/2:R], x[:R/2]]: the partner enters negated in the first half
    rot = tl.where((offs < R // 2)[None, :], -xp, xp)
    a = (x * cos).to(OUT_DTYPE).to(tl.float32)
    b = (rot * sin).to(OUT_DTYPE).to(tl.float32)
    return tl.where((offs < R)[None, :], a + b, x)


@triton.jit
def _cache_rows(cache_ptr, head, stride_h, stride_n, stride_b, slot, mask, BLOCK_SIZE: tl.constexpr):
    """Row pointers [BLOCK_T, 1] of the tokens' slots in one head of a cache, and the store mask:
    inside the tile and a real slot (negative: a padding row, not written)."""
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    rows = cache_ptr + head.to(tl.int64) * stride_h + blk * stride_n + off * stride_b  # [BLOCK_T]
    return rows[:, None], mask & (slot >= 0)[:, None]


@triton.jit
def _qkv_norm_rope_write_kernel(
        qkv_ptr, stride_qkv_t, num_tokens,
        q_norm_ptr, k_norm_ptr, eps,
        cos_ptr, sin_ptr, stride_cos, stride_sin, pos_ptr,
        slot_ptr,
        q_out_ptr, stride_qo_t, stride_qo_h,
        k_ptr, stride_kh, stride_kn, stride_kb,
        v_ptr, stride_vh, stride_vn, stride_vb,
        HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr):
    h = tl.program_id(0)  # 0..HQ-1: q heads, HQ..HQ+HK-1: k heads, then v heads
    toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs = tl.arange(0, BLOCK_D)
    t_ok = toks < num_tokens
    mask = t_ok[:, None] & (offs < D)[None, :]  # [BLOCK_T, BLOCK_D]
    half: tl.constexpr = R // 2
    pair = tl.where(offs < half, offs + half, tl.where(offs < R, offs - half, offs))
    src = (qkv_ptr + toks.to(tl.int64) * stride_qkv_t + h * D)[:, None]  # [BLOCK_T, 1]
    out_dtype = q_out_ptr.dtype.element_ty
    if h < HQ + HK:
        pos = tl.load(pos_ptr + toks, mask=t_ok, other=0).to(tl.int64)
        cos_rows = (cos_ptr + pos * stride_cos)[:, None]
        sin_rows = (sin_ptr + pos * stride_sin)[:, None]
        if h < HQ:
            y = _norm_rope_head(src, offs, pair, mask, q_norm_ptr, cos_rows, sin_rows, eps,
                                D, R, HAS_Q_NORM, out_dtype)
            dst = q_out_ptr + toks.to(tl.int64) * stride_qo_t + h * stride_qo_h
            tl.store(dst[:, None] + offs[None, :], y, mask=mask)
        else:
            y = _norm_rope_head(src, offs, pair, mask, k_norm_ptr, cos_rows, sin_rows, eps,
                                D, R, HAS_K_NORM, out_dtype)
            slot = tl.load(slot_ptr + toks, mask=t_ok, other=-1)
            rows, keep = _cache_rows(k_ptr, h - HQ, stride_kh, stride_kn, stride_kb, slot, mask, BLOCK_SIZE)
            tl.store(rows + offs[None, :], y, mask=keep)
    else:
        x = tl.load(src + offs[None, :], mask=mask, other=0.0)
        slot = tl.load(slot_ptr + toks, mask=t_ok, other=-1)
        rows, keep = _cache_rows(v_ptr, h - HQ - HK, stride_vh, stride_vn, stride_vb, slot, mask, BLOCK_SIZE)
        tl.store(rows + offs[None, :], x, mask=keep)


def qkv_norm_rope_write(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                        q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, rotary_dim: int,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hk) * D] -> q [T, Hq, D]; k (normed, rotated) and v written to the cache.

    q_norm_w, k_norm_w: [D] or None (no norm for that side). cos, sin: [P, R] tables (duplicated halves,
    any float dtype), looked up at positions [T] (int32/int64). slot_mapping [T] int64: the flat cache
    slot of each token; a negative slot writes nothing. q_out: optional [T, Hq, D] destination with unit
    stride on D. Every step computes in float32 and rounds to qkv's dtype where the torch reference does.
    """
    t = qkv.shape[0]
    hq, hk, d, r = num_heads, num_kv_heads, head_dim, rotary_dim
    if qkv.dim() != 2 or qkv.shape[1] != (hq + 2 * hk) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} for {hq} + 2 x {hk} heads of {d}")
    if r % 2 or not 0 < r <= d or cos.shape[-1] != r or sin.shape[-1] != r:
        raise ValueError(f"rotary_dim {r} with tables {tuple(cos.shape)}, {tuple(sin.shape)} and head_dim {d}")
    _check_cache(k_cache, v_cache, d)
    if k_cache.shape[0] != hk:
        raise ValueError(f"cache has {k_cache.shape[0]} kv heads, expected {hk}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("cos/sin need unit stride along the rotary dim")
    if q_out is None:
        q_out = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
    elif q_out.shape != (t, hq, d) or q_out.stride(2) != 1:
        raise ValueError(f"q_out {tuple(q_out.shape)} for [{t}, {hq}, {d}]")
    if t == 0:
        return q_out
    qn = q_norm_w if q_norm_w is not None else qkv  # a placeholder pointer, never read
    kn = k_norm_w if k_norm_w is not None else qkv
    # A program per (head, tile of tokens): a tile of 16 rows moves 4 KB per head at D = 128 in bf16,
    # enough for its loads to overlap; q, k and v heads differ in what they do, tokens do not.
    block_t = min(QKV_TOKENS_PER_PROGRAM, triton.next_power_of_2(t))
    _qkv_norm_rope_write_kernel[(hq + 2 * hk, triton.cdiv(t, block_t))](
        qkv, qkv.stride(0), t,
        qn, kn, float(eps),
        cos, sin, cos.stride(0), sin.stride(0), positions,
        slot_mapping,
        q_out, q_out.stride(0), q_out.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ=hq, HK=hk, D=d, BLOCK_D=triton.next_power_of_2(d), R=r, BLOCK_T=block_t, BLOCK_SIZE=k_cache.shape[2],
        HAS_Q_NORM=q_norm_w is not None, HAS_K_NORM=k_norm_w is not None, num_warps=4)
    return q_out


# --------------------------------------------------------------------------------------------------
# Shared inner step: one tile of keys for a tile of query rows
# --------------------------------------------------------------------------------------------------

@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_base, v_base, table_row, n0, key_end, pos, scale_log2,
                 stride_kn, stride_kb, stride_vn, stride_vb,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                 BOUNDED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with keys n0 .. n0 + BLOCK_N - 1 of one sequence.

    BOUNDED: keys at or past key_end are absent (their table entries and rows are not read).
    CAUSAL: row i sees only keys <= pos[i]. Scores are in base 2 (scale_log2 = scale * log2 e).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    keys = n0 + offs_n  # [BLOCK_N]
    if BOUNDED:
        present = keys < key_end
        blk = tl.load(table_row + keys // BLOCK_SIZE, mask=present, other=0).to(tl.int64)
    else:
        blk = tl.load(table_row + keys // BLOCK_SIZE).to(tl.int64)
    off = keys % BLOCK_SIZE
    k_ptrs = k_base + blk[:, None] * stride_kn + off[:, None] * stride_kb + offs_d[None, :]  # [BLOCK_N, D]
    v_ptrs = v_base + blk[:, None] * stride_vn + off[:, None] * stride_vb + offs_d[None, :]
    if BOUNDED:
        k = tl.load(k_ptrs, mask=present[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, BLOCK_N] float32
    if CAUSAL:
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
    if BOUNDED:
        s = tl.where(present[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # Absent rows of V are zeroed, not just weighted by 0: an unwritten cache slot may hold NaN.
    if BOUNDED:
        v = tl.load(v_ptrs, mask=present[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(
        q_ptr, stride_qb, stride_qh,
        k_ptr, stride_kh, stride_kn, stride_kb,
        v_ptr, stride_vh, stride_vn, stride_vb,
        table_ptr, stride_tb, lens_ptr,
        out_ptr, stride_ob, stride_oh,
        part_ml_ptr, part_acc_ptr,
        scale_log2, num_splits,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g  # [BLOCK_G] query heads of this kv head (rows past G are padding)
    g_ok = offs_g < G
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)  # [BLOCK_G, D]

    # This split's keys: an equal share of the sequence's tiles, so every boundary falls on a tile edge.
    ctx = tl.load(lens_ptr + b)
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    table_row = table_ptr + b.to(tl.int64) * stride_tb
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    pos = tl.zeros([BLOCK_G], tl.int32)  # unused: decode is not causal within its one query
    for n0 in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_base, v_base, table_row, n0, end, pos, scale_log2,
                                     stride_kn, stride_kb, stride_vn, stride_vb,
                                     BLOCK_N, BLOCK_SIZE, D, False, False, PRECISION)
    for n0 in range(full_end, end, BLOCK_N):  # the partial last tile, at most one
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_base, v_base, table_row, n0, end, pos, scale_log2,
                                     stride_kn, stride_kb, stride_vn, stride_vb,
                                     BLOCK_N, BLOCK_SIZE, D, True, False, PRECISION)

    if SPLIT:
        # partials [B, Hq, S, ...]: (m, l) pairs and the unnormalised accumulator
        row = (b.to(tl.int64) * (tl.num_programs(1) * G) + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_ok)
        tl.store(part_acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None])
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # no keys: acc is 0, the output stays 0
        o = acc / l_safe[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _decode_combine_kernel(part_ml_ptr, part_acc_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                           HQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D)
    base = (b.to(tl.int64) * HQ + h) * num_splits
    # Two passes over the pieces, BLOCK_S at a time (their count is not bounded by a register tile):
    # first their common maximum, then the rescaled sums. Padding lanes get m = -inf so that their
    # weight is exactly 0; real pieces that saw no key carry NEG_BIG with l = 0 and acc = 0.
    m_lanes = tl.full([BLOCK_S], NEG_BIG, tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(part_ml_ptr + (base + offs_s) * 2, mask=offs_s < num_splits, other=float("-inf"))
        m_lanes = tl.maximum(m_lanes, m)
    m_all = tl.max(m_lanes, axis=0)
    acc = tl.zeros([D], tl.float32)
    denom_lanes = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        rows = base + offs_s  # [BLOCK_S]
        m = tl.load(part_ml_ptr + rows * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + rows * 2 + 1, mask=s_ok, other=0.0)
        part = tl.load(part_acc_ptr + rows[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        w = tl.exp2(m - m_all)  # [BLOCK_S]
        denom_lanes += l * w
        acc += tl.sum(part * w[:, None], axis=0)
    denom = tl.sum(denom_lanes, axis=0)
    o = acc / tl.where(denom > 0.0, denom, 1.0)  # [D]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def decode_splits(batch: int, num_kv_heads: int, max_context_len: int, num_sms: int = 132) -> int:
    """How many pieces to cut each decode context into: enough (sequence, kv head, piece) programs for
    DECODE_PROGRAMS_PER_SM per SM, but no piece under MIN_SPLIT_TOKENS keys and at most MAX_SPLITS.

    A function of its arguments alone: for a captured graph pass the largest context the graph will
    serve (e.g. the model's maximum length), so one batch size always maps to one split count."""
    pairs = max(1, batch * num_kv_heads)
    want = -(-DECODE_PROGRAMS_PER_SM * num_sms // pairs)
    by_length = -(-max(1, max_context_len) // MIN_SPLIT_TOKENS)
    return max(1, min(want, by_length, MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int, out: torch.Tensor | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """q [B, Hq, D], one token per sequence -> [B, Hq, D] attention over each sequence's cached tokens.

    block_table [B, M] int32: sequence b's token n is in block block_table[b, n // bs]; entries past
    its context are never read. context_lens [B] int32: keys per sequence; 0 gives a zero row.
    num_splits >= 1: pieces per context (see decode_splits). out: optional [B, Hq, D] destination with
    unit stride on D. Launches one kernel (num_splits == 1) or two; no host sync, capturable.
    """
    b, hq, d = q.shape
    hk, bs = _check_query(q, k_cache, v_cache)
    if block_table.dim() != 2 or block_table.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(f"block_table {tuple(block_table.shape)}, context_lens {tuple(context_lens.shape)} "
                         f"for batch {b}")
    if num_splits < 1:
        raise ValueError(f"num_splits {num_splits}")
    g = hq // hk
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} for {tuple(q.shape)}")
    if b == 0:
        return out
    cfg = config or decode_config(d, q.dtype)
    split = num_splits > 1
    if split:
        part_ml = torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=q.device)  # (m, l) per piece
        part_acc = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    else:
        part_ml = part_acc = out  # placeholders, never touched with SPLIT off
    _decode_kernel[(b, hk, num_splits)](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table, block_table.stride(0), context_lens,
        out, out.stride(0), out.stride(1),
        part_ml, part_acc,
        float(scale) * LOG2E, num_splits,
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=cfg.block_n, BLOCK_SIZE=bs,
        SPLIT=split, PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        _decode_combine_kernel[(b, hq)](
            part_ml, part_acc, out, out.stride(0), out.stride(1), num_splits,
            HQ=hq, D=d, BLOCK_S=min(16, triton.next_power_of_2(num_splits)), num_warps=4 if d >= 128 else 2)
    return out


# --------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------

@dataclass
class PrefillBatch:
    """A step's prefill chunks. Chunk i owns rows query_start[i] .. query_start[i+1]-1 of q (chunks are
    consecutive), has lengths[i] new tokens and attends to context_lens[i] cached tokens (its own new
    ones included) found through block_table[i]."""
    query_start: torch.Tensor  # [S + 1] int32, device
    context_lens: torch.Tensor  # [S] int32, device
    block_table: torch.Tensor  # [S, M] int32, device
    lengths: list[int]  # host copies: the tile table is built from these, never from device tensors
    host_context_lens: list[int]
    max_len: int  # longest chunk
    _tiles: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # tokens per tile -> table

    @property
    def num_chunks(self) -> int:
        return len(self.lengths)

    def tiles(self, tile_tokens: int) -> torch.Tensor:
        """[num_tiles, 2] int32 (chunk, first token of the tile within the chunk), the tiles with the
        most keys first. Built once per tile height and shared by every layer of the step."""
        table = self._tiles.get(tile_tokens)
        if table is None:
            work = []
            for i, (n, ctx) in enumerate(zip(self.lengths, self.host_context_lens)):
                for q0 in range(0, n, tile_tokens):
                    keys = ctx - n + min(q0 + tile_tokens, n)
                    work.append((-keys, i, q0))
            work.sort()
            rows = [(i, q0) for _, i, q0 in work]
            table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(self.query_start.device)
            self._tiles[tile_tokens] = table
        return table


def prefill_batch(starts: Sequence[int], lengths: Sequence[int], context_lens: Sequence[int],
                  block_tables: Sequence[Sequence[int]] | torch.Tensor,
                  device: torch.device | str) -> PrefillBatch:
    """Describe prefill chunks from host ints. Chunk i's queries are rows starts[i] ..
    starts[i] + lengths[i] - 1 of q; chunks must be consecutive (starts[i+1] == starts[i] + lengths[i]),
    starts[0] may be past decode rows. context_lens[i] >= lengths[i]. block_tables: per chunk a list of
    block ids covering its context (ragged lists are padded with 0), or a padded [S, M] tensor."""
    s = len(lengths)
    if len(starts) != s or len(context_lens) != s:
        raise ValueError("starts, lengths and context_lens differ in length")
    for i in range(s):
        if lengths[i] < 0 or context_lens[i] < lengths[i]:
            raise ValueError(f"chunk {i}: length {lengths[i]}, context {context_lens[i]}")
        if i and starts[i] != starts[i - 1] + lengths[i - 1]:
            raise ValueError(f"chunk {i} starts at {starts[i]}, not right after chunk {i - 1}")
    bounds = [starts[0] if s else 0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if isinstance(block_tables, torch.Tensor):
        table = block_tables.to(device=device, dtype=torch.int32)
    else:
        width = max([len(t) for t in block_tables] + [1])
        table = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables] or [[0]],
                             dtype=torch.int32)[:max(s, 1)].to(device)
    return PrefillBatch(query_start=torch.tensor(bounds, dtype=torch.int32).to(device),
                        context_lens=torch.tensor(list(context_lens), dtype=torch.int32).to(device),
                        block_table=table, lengths=list(lengths), host_context_lens=list(context_lens),
                        max_len=max(lengths, default=0))


@triton.jit
def _prefill_kernel(
        q_ptr, stride_qt, stride_qh,
        k_ptr, stride_kh, stride_kn, stride_kb,
        v_ptr, stride_vh, stride_vn, stride_vb,
        table_ptr, stride_tb, lens_ptr, qstart_ptr, tiles_ptr,
        out_ptr, stride_ot, stride_oh,
        scale_log2,
        G: tl.constexpr, TILE_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    chunk = tl.load(tiles_ptr + tile * 2)
    q0 = tl.load(tiles_ptr + tile * 2 + 1)
    row0 = tl.load(qstart_ptr + chunk)
    n = tl.load(qstart_ptr + chunk + 1) - row0
    ctx = tl.load(lens_ptr + chunk)
    past = ctx - n  # tokens before this chunk: query j sits at position past + j

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    tok = q0 + offs_m // G  # [BLOCK_M] token of each row within the chunk
    heads = kvh * G + offs_m % G
    row_ok = (offs_m < TILE_Q * G) & (tok < n)
    pos = past + tok
    q_rows = (row0 + tok).to(tl.int64) * stride_qt + heads * stride_qh  # [BLOCK_M]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    # Keys 0 .. past + q0 are visible to every row; the rest up to the last row's position need the mask.
    key_end = past + tl.minimum(q0 + TILE_Q, n)
    open_end = (past + q0 + 1) // BLOCK_N * BLOCK_N

    table_row = table_ptr + chunk.to(tl.int64) * stride_tb
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, open_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_base, v_base, table_row, n0, key_end, pos, scale_log2,
                                     stride_kn, stride_kb, stride_vn, stride_vb,
                                     BLOCK_N, BLOCK_SIZE, D, False, False, PRECISION)
    for n0 in range(open_end, key_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_base, v_base, table_row, n0, key_end, pos, scale_log2,
                                     stride_kn, stride_kb, stride_vn, stride_vb,
                                     BLOCK_N, BLOCK_SIZE, D, True, True, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_rows = (row0 + tok).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            chunks: PrefillBatch, scale: float, out: torch.Tensor | None = None,
                            config: PrefillConfig | None = None) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]: each chunk's rows attend causally over its sequence's cache.

    The chunks' own K/V must already be in the cache. Only the chunks' rows of out are written: with
    out given, other rows (a step's decode rows) are left as they are; a fresh out has them unset.
    """
    t, hq, d = q.shape
    hk, bs = _check_query(q, k_cache, v_cache)
    g = hq // hk
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} for {tuple(q.shape)}")
    cfg = config or prefill_config(d, g, q.dtype)
    tile_tokens = cfg.block_m // g
    if tile_tokens < 1:
        raise ValueError(f"block_m {cfg.block_m} is smaller than the group of {g} heads")
    tiles = chunks.tiles(tile_tokens)
    if tiles.shape[0] == 0:
        return out
    if tiles.shape[0] > 65535:
        raise ValueError(f"{tiles.shape[0]} query tiles exceed the grid's second dimension")
    _prefill_kernel[(hk, tiles.shape[0])](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        chunks.block_table, chunks.block_table.stride(0), chunks.context_lens, chunks.query_start, tiles,
        out, out.stride(0), out.stride(1),
        float(scale) * LOG2E,
        G=g, TILE_Q=tile_tokens, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, BLOCK_SIZE=bs,
        PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
