"""The Triton paged-attention kernels (mesh/model/cuda/attention.py) against short float64 references.

On the CPU the kernels run in Triton's interpreter in float32 with tiny shapes and small tiles, so a
few dozen tokens already span several key tiles, splits and query tiles. With MESH_TEST_DEVICE=cuda
the same tests run on the GPU, plus the bf16 variants, CUDA-graph capture and a sync-free check.
Unused cache slots hold NaN, so a kernel that reads past a context (or weights a masked value by 0
instead of not reading it) fails loudly.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE, native_env
from mesh.model.cuda import attention as A

ON_GPU = DEVICE.startswith("cuda")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (MESH_TEST_DEVICE=cuda); "
                                                  "the interpreter's bf16 results are not meaningful")
# Small tiles: the interpreter runs every program in Python, and short contexts still cross tiles.
SMALL_DECODE = A.DecodeConfig(block_n=16, num_warps=4, num_stages=1)
SMALL_PREFILL = A.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=[gpu, needs_gpu])]


def _tol(dtype):
    return 2e-5 if dtype == torch.float32 else 1.5e-2


def _close(out, ref, dtype):
    """Relative Frobenius error per row set; NaN never passes."""
    out = out.detach().double().cpu()
    ref = ref.double().cpu()
    assert not torch.isnan(out).any()
    err = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < _tol(dtype), float(err)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


class Pool:
    """A [L, 2, Hk, N, bs, D] pool with layer 1's K and V as the caches under test (strided views)."""

    def __init__(self, hk, num_blocks, bs, d, dtype, gen, layers=2):
        self.bs = bs
        self.pool = torch.full((layers, 2, hk, num_blocks, bs, d), float("nan"), dtype=dtype, device=DEVICE)
        self.k, self.v = self.pool[1, 0], self.pool[1, 1]
        self.free = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled block order
        self.gen = gen

    def sequence(self, ctx):
        """Allocate blocks for ctx tokens and fill them with random K/V -> block ids."""
        blocks = [self.free.pop() for _ in range(-(-ctx // self.bs))]
        hk, d = self.k.shape[0], self.k.shape[3]
        pos = torch.arange(ctx)
        slots = torch.tensor(blocks, dtype=torch.int64)[pos // self.bs] * self.bs + pos % self.bs
        for cache in (self.k, self.v):
            vals = torch.randn(hk, ctx, d, generator=self.gen).to(cache.dtype).to(DEVICE)
            cache.view(hk, -1, d)[:, slots.to(DEVICE)] = vals
        return blocks

    def keys(self, blocks, ctx):
        """Reference gather: [Hk, ctx, D] float64 K and V of one sequence."""
        pos = torch.arange(ctx)
        blk = torch.tensor(blocks, dtype=torch.int64)[pos // self.bs] if ctx else pos
        off = pos % self.bs
        k = self.k.double().cpu()[:, blk, off]
        v = self.v.double().cpu()[:, blk, off]
        return k, v


def _attend(q, k, v, scale, qpos=None):
    """q [n, Hq, D], k/v [Hk, ctx, D] (float64) -> [n, Hq, D]; qpos [n]: causal positions (None: all)."""
    n, hq, d = q.shape
    hk, ctx, _ = k.shape
    if ctx == 0:
        return torch.zeros(n, hq, d, dtype=torch.float64)
    g = hq // hk
    kk = k.repeat_interleave(g, 0)  # [Hq, ctx, D]
    vv = v.repeat_interleave(g, 0)
    s = torch.einsum("nhd,hcd->hnc", q, kk) * scale  # [Hq, n, ctx]
    if qpos is not None:
        s = s.masked_fill(torch.arange(ctx)[None, None, :] > qpos[None, :, None], float("-inf"))
    return torch.einsum("hnc,hcd->nhd", torch.softmax(s, -1), vv)


def _table(block_lists, width=None):
    width = width or max([len(b) for b in block_lists] + [1])
    # Padding entries point at a block that exists but is not the sequence's: never to be read.
    return torch.tensor([b + [0] * (width - len(b)) for b in block_lists], dtype=torch.int32, device=DEVICE)


# ----------------------------------------------------------------------------------------- decode

DECODE_CASES = [
    # block_size, G, D, num_splits, context lengths
    (16, 1, 32, 1, [1, 16, 17, 300]),
    (4, 2, 64, 3, [0, 5, 4, 33]),
    (32, 4, 32, 8, [300, 1, 32, 0]),
    (16, 8, 64, 1, [17, 0, 64]),
    (16, 8, 32, 8, [1, 2, 20]),  # more splits than tiles
    (4, 4, 32, 3, [300]),
    (32, 2, 64, 8, [33, 100]),
    (4, 1, 32, 40, [300, 3]),  # more pieces than one pass of the combine kernel takes
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,g,d,splits,lens", DECODE_CASES)
def test_decode_matches_reference(bs, g, d, splits, lens, dtype):
    gen = torch.Generator().manual_seed(hash((bs, g, d, splits, tuple(lens))) % 2**31)
    hk = 2
    need = sum(-(-n // bs) for n in lens)
    pool = Pool(hk, need + 5, bs, d, dtype, gen)
    tables = [pool.sequence(n) for n in lens]
    b = len(lens)
    q = torch.randn(b, hk * g, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    table = _table(tables, width=max(len(t) for t in tables) + 2)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = A.paged_decode_attention(q, pool.k, pool.v, table, ctx, scale, splits, config=SMALL_DECODE)
    qd = q.double().cpu()
    ref = torch.cat([_attend(qd[i:i + 1], *pool.keys(tables[i], n), scale) for i, n in enumerate(lens)])
    _close(out, ref, dtype)
    assert (out[torch.tensor(lens, device=DEVICE) == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_default_tiles(splits, dtype):
    """The Hopper tile shapes (decode_config) on a context that crosses a few of their tiles."""
    gen = torch.Generator().manual_seed(11)
    bs, hk, g, d = 16, 2, 4, 64
    lens = [150, 7]
    pool = Pool(hk, 16, bs, d, dtype, gen)
    tables = [pool.sequence(n) for n in lens]
    q = torch.randn(len(lens), hk * g, d, generator=gen).to(dtype).to(DEVICE)
    out = A.paged_decode_attention(q, pool.k, pool.v, _table(tables),
                                   torch.tensor(lens, dtype=torch.int32, device=DEVICE), 0.3, splits)
    qd = q.double().cpu()
    ref = torch.cat([_attend(qd[i:i + 1], *pool.keys(tables[i], n), 0.3) for i, n in enumerate(lens)])
    _close(out, ref, dtype)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_padding_rows_are_zero(splits):
    """A captured batch's padding rows: context 0, table of zeros, and q that may hold anything."""
    gen = torch.Generator().manual_seed(5)
    pool = Pool(2, 4, 16, 32, torch.float32, gen)
    q = torch.randn(3, 4, 32, generator=gen).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    A.paged_decode_attention(q, pool.k, pool.v, torch.zeros(3, 2, dtype=torch.int32, device=DEVICE),
                             torch.zeros(3, dtype=torch.int32, device=DEVICE), 0.2, splits, out=out,
                             config=SMALL_DECODE)
    assert (out == 0).all()


def test_decode_writes_into_a_strided_out():
    """out may be a view (e.g. the decode rows of a step's [T, Hq, D] buffer); rows around it stay."""
    gen = torch.Generator().manual_seed(8)
    bs, hk, g, d = 8, 2, 2, 32
    pool = Pool(hk, 8, bs, d, torch.float32, gen)
    lens = [9, 30]
    tables = [pool.sequence(n) for n in lens]
    q = torch.randn(2, hk * g, d, generator=gen).to(DEVICE)
    big = torch.full((5, hk * g, d), 7.0, device=DEVICE)
    A.paged_decode_attention(q, pool.k, pool.v, _table(tables), torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                             0.25, 2, out=big[1:3], config=SMALL_DECODE)
    qd = q.double().cpu()
    ref = torch.cat([_attend(qd[i:i + 1], *pool.keys(tables[i], n), 0.25) for i, n in enumerate(lens)])
    _close(big[1:3], ref, torch.float32)
    assert (big[0] == 7).all() and (big[3:] == 7).all()


def test_decode_splits_heuristic():
    s = A.decode_splits
    assert s(1, 4, 512) > 1  # one short sequence still spreads over several programs
    assert s(1, 4, 512) == s(1, 4, 512)
    assert s(1, 4, 32768) == A.MAX_SPLITS
    assert s(256, 4, 32768) == 1  # a full batch fills the GPU by itself
    assert s(4, 4, 1) == 1 and s(4, 4, 0) == 1
    for b in (1, 2, 8, 64, 256):
        for ctx in (1, 100, 512, 4096, 32768):
            n = s(b, 4, ctx)
            assert 1 <= n <= A.MAX_SPLITS and n <= max(1, -(-ctx // A.MIN_SPLIT_TOKENS))


# ---------------------------------------------------------------------------------------- prefill

PREFILL_CASES = [
    # block_size, G, D, [(length, context_len)]
    (16, 1, 32, [(5, 5)]),
    (4, 2, 32, [(7, 40)]),  # cached prefix
    (16, 4, 64, [(1, 30)]),  # a chunk of one token
    (32, 2, 32, [(13, 13), (1, 70), (20, 52), (3, 3)]),  # several chunks in one call
    (4, 8, 32, [(9, 9), (6, 17)]),
    (16, 2, 64, [(40, 75)]),
]


def _run_prefill(bs, g, d, chunks, dtype, config, lead=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hk = 2
    need = sum(-(-ctx // bs) for _, ctx in chunks)
    pool = Pool(hk, need + 3, bs, d, dtype, gen)
    tables = [pool.sequence(ctx) for _, ctx in chunks]
    lengths = [n for n, _ in chunks]
    t = lead + sum(lengths)
    q = torch.randn(t, hk * g, d, generator=gen).to(dtype).to(DEVICE)
    starts = [lead + sum(lengths[:i]) for i in range(len(chunks))]
    batch = A.prefill_batch(starts, lengths, [c for _, c in chunks], tables, DEVICE)
    scale = d ** -0.5
    out = torch.full_like(q, 3.0)
    A.paged_prefill_attention(q, pool.k, pool.v, batch, scale, out=out, config=config)
    qd = q.double().cpu()
    refs = []
    for (n, ctx), s, blocks in zip(chunks, starts, tables):
        refs.append(_attend(qd[s:s + n], *pool.keys(blocks, ctx), scale, qpos=torch.arange(ctx - n, ctx)))
    _close(out[lead:], torch.cat(refs), dtype)
    assert (out[:lead] == 3.0).all()  # rows before the chunks (decode rows) untouched
    return batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,g,d,chunks", PREFILL_CASES)
def test_prefill_matches_reference(bs, g, d, chunks, dtype):
    _run_prefill(bs, g, d, chunks, dtype, SMALL_PREFILL, lead=2, seed=len(chunks) * 7 + bs + g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_default_tiles(dtype):
    _run_prefill(16, 4, 32, [(70, 90), (1, 17), (33, 33)], dtype, None, seed=4)


def test_prefill_group_wider_than_the_tile_rounds_rows():
    """G = 3 (not a power of two) leaves the last row of a 16-row tile unused: 5 tokens x 3 heads."""
    _run_prefill(8, 3, 32, [(11, 20), (4, 4)], torch.float32, SMALL_PREFILL, seed=9)


def test_prefill_tile_table_is_built_on_the_host_longest_first():
    batch = A.prefill_batch([0, 10, 11], [10, 1, 30], [10, 50, 30], [[0], [1, 2, 3, 4], [5, 6]], "cpu")
    tiles = batch.tiles(8).tolist()
    assert sorted(map(tuple, tiles)) == sorted([(0, 0), (0, 8), (1, 0), (2, 0), (2, 8), (2, 16), (2, 24)])
    lengths, ctxs = [10, 1, 30], [10, 50, 30]
    keys = [ctxs[c] - lengths[c] + min(q0 + 8, lengths[c]) for c, q0 in tiles]  # keys each tile visits
    assert keys == sorted(keys, reverse=True)
    assert batch.tiles(8) is batch.tiles(8)  # cached for the step's other layers
    assert batch.query_start.tolist() == [0, 10, 11, 41] and batch.max_len == 30
    with pytest.raises(ValueError):
        A.prefill_batch([0, 5], [4, 1], [4, 1], [[0], [1]], "cpu")  # a gap between chunks


def test_decode_and_prefill_match_the_torch_path(monkeypatch):
    """One mixed step (two decode rows, then two prefill chunks) against mesh.model.attention's torch
    ops (the native CPU kernels switched off)."""
    from mesh.model.attention import AttentionMetadata, PrefillChunk, paged_attention
    gen = torch.Generator().manual_seed(21)
    bs, hk, g, d = 16, 2, 2, 32
    pool = Pool(hk, 24, bs, d, torch.float32, gen)
    # the torch path gathers whole padded blocks and weights them by 0: no NaN there
    pool.pool.copy_(torch.randn(pool.pool.shape, generator=gen))
    dec = [40, 3]
    pre = [(12, 30), (5, 5)]
    dec_tables = [pool.sequence(n) for n in dec]
    pre_tables = [pool.sequence(c) for _, c in pre]
    t = len(dec) + sum(n for n, _ in pre)
    q = torch.randn(t, hk * g, d, generator=gen).to(DEVICE)
    table = _table(dec_tables)
    lens = torch.tensor(dec, dtype=torch.int32, device=DEVICE)
    starts = [2, 14]
    chunks = [PrefillChunk(s, n, c, torch.tensor(b, device=DEVICE)) for s, (n, c), b in zip(starts, pre, pre_tables)]
    meta = AttentionMetadata(slot_mapping=torch.zeros(t, dtype=torch.int64, device=DEVICE), num_decode=2,
                             decode_block_table=table.long(), decode_context_lens=lens.long(), prefills=chunks)
    native_env(monkeypatch, "MESH_NATIVE_KERNELS", "0")
    ref = paged_attention(q, None, None, pool.k, pool.v, meta, 0.2).view(t, hk * g, d)
    out = torch.empty_like(q)
    A.paged_decode_attention(q[:2], pool.k, pool.v, table, lens, 0.2, 2, out=out[:2], config=SMALL_DECODE)
    batch = A.prefill_batch(starts, [n for n, _ in pre], [c for _, c in pre], pre_tables, DEVICE)
    A.paged_prefill_attention(q, pool.k, pool.v, batch, 0.2, out=out, config=SMALL_PREFILL)
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ norm + rope + write

def _rope_table(rotary_dim, positions, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(positions).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, R]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _ref_norm_rope(x, w, eps, cos, sin, r):
    """x [T, H, D] in the model dtype, cos/sin [T, 1, R] -> rounded as transformers does."""
    if w is not None:
        xf = x.float()
        x = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rh = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rh * sin, rest), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["none", "qk", "q", "k"])
@pytest.mark.parametrize("partial", [False, True])
def test_qkv_norm_rope_write(norm, partial, dtype):
    gen = torch.Generator().manual_seed(3 + partial * 10 + len(norm))
    hq, hk, d, bs, t = 4, 2, 64, 4, 21  # two tiles of 16 tokens
    r = d // 4 if partial else d
    pool = Pool(hk, 10, bs, d, dtype, gen)
    pool.pool.copy_(torch.randn(pool.pool.shape, generator=gen).to(dtype))
    before = pool.pool.cpu()
    qkv = (torch.randn(t, (hq + 2 * hk) * d, generator=gen) * 3).to(dtype).to(DEVICE)
    qw = (torch.rand(d, generator=gen) + 0.5).to(dtype).to(DEVICE) if norm in ("qk", "q") else None
    kw = (torch.rand(d, generator=gen) + 0.5).to(dtype).to(DEVICE) if norm in ("qk", "k") else None
    cos, sin = _rope_table(r, 64, dtype)
    positions = torch.randint(0, 64, (t,), generator=gen)
    slots = torch.randperm(10 * bs, generator=gen)[:t]
    slots[[2, 5]] = -1  # padding rows: not written
    q = A.qkv_norm_rope_write(qkv, hq, hk, d, qw, kw, 1e-6, cos.to(DEVICE), sin.to(DEVICE), positions.to(DEVICE),
                              r, pool.k, pool.v, slots.to(DEVICE))
    x = qkv.cpu().view(t, hq + 2 * hk, d)
    c, s = cos[positions][:, None], sin[positions][:, None]
    q_ref = _ref_norm_rope(x[:, :hq], None if qw is None else qw.cpu(), 1e-6, c, s, r)
    k_ref = _ref_norm_rope(x[:, hq:hq + hk], None if kw is None else kw.cpu(), 1e-6, c, s, r)
    expect = before.clone()
    ok = slots >= 0
    ek, ev = expect[1, 0].view(hk, -1, d), expect[1, 1].view(hk, -1, d)
    ek[:, slots[ok]] = k_ref[ok].transpose(0, 1)
    ev[:, slots[ok]] = x[ok, hq + hk:].transpose(0, 1)
    if dtype == torch.float32:
        torch.testing.assert_close(q.cpu(), q_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.pool.cpu(), expect, atol=1e-5, rtol=1e-5)
    else:  # the same rounding points: at most one bf16 ulp apart where the float32 sums differ
        torch.testing.assert_close(q.cpu().float(), q_ref.float(), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(pool.pool.cpu().float(), expect.float(), atol=2e-2, rtol=1e-2)
    # Slots of skipped rows and the other layer: bit-for-bit what they were.
    assert torch.equal(pool.pool[0].cpu(), before[0])
    untouched = torch.ones(pool.k.view(hk, -1, d).shape[1], dtype=torch.bool)
    untouched[slots[ok]] = False
    assert torch.equal(pool.k.reshape(hk, -1, d)[:, untouched.to(DEVICE)].cpu(), before[1, 0].view(hk, -1, d)[:, untouched])


def test_qkv_write_then_prefill_sees_its_own_tokens():
    """The kernels in the order a step runs them: write a chunk's K/V, then attend over the cache."""
    gen = torch.Generator().manual_seed(17)
    hq, hk, d, bs = 4, 2, 32, 4
    pool = Pool(hk, 12, bs, d, torch.float32, gen)
    past = pool.sequence(10)  # a cached prefix of 10 tokens in 3 blocks, 2 slots of the last still free
    blocks = past + [pool.free.pop(), pool.free.pop()]
    n, ctx = 6, 16
    pos = torch.arange(ctx - n, ctx)
    slots = torch.tensor(blocks)[pos // bs] * bs + pos % bs
    qkv = torch.randn(n, (hq + 2 * hk) * d, generator=gen).to(DEVICE)
    cos, sin = _rope_table(d, 32, torch.float32)
    q = A.qkv_norm_rope_write(qkv, hq, hk, d, None, None, 1e-6, cos.to(DEVICE), sin.to(DEVICE),
                              pos.to(DEVICE), d, pool.k, pool.v, slots.to(DEVICE))
    batch = A.prefill_batch([0], [n], [ctx], [blocks], DEVICE)
    out = A.paged_prefill_attention(q, pool.k, pool.v, batch, 0.3, config=SMALL_PREFILL)
    ref = _attend(q.double().cpu(), *pool.keys(blocks, ctx), 0.3, qpos=pos)
    _close(out, ref, torch.float32)


# ------------------------------------------------------------------------------------- GPU only

@gpu
@needs_gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_replays_in_a_cuda_graph(splits):
    gen = torch.Generator().manual_seed(2)
    bs, hk, g, d, b, width = 16, 4, 8, 128, 3, 40
    dtype = torch.bfloat16
    pool = Pool(hk, 3 * width + 4, bs, d, dtype, gen)
    q = torch.randn(b, hk * g, d, generator=gen).to(dtype).to(DEVICE)
    table = torch.zeros(b, width, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        A.paged_decode_attention(q, pool.k, pool.v, table, lens, 0.1, splits, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.paged_decode_attention(q, pool.k, pool.v, table, lens, 0.1, splits, out=out)
    for lens_now in ([600, 1, 0], [17, 640, 33]):
        tables = [pool.sequence(n) for n in lens_now]
        table.copy_(_table(tables, width))
        lens.copy_(torch.tensor(lens_now, dtype=torch.int32))
        q.copy_(torch.randn(b, hk * g, d, generator=gen).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        qd = q.double().cpu()
        ref = torch.cat([_attend(qd[i:i + 1], *pool.keys(tables[i], n), 0.1) for i, n in enumerate(lens_now)])
        _close(out, ref, dtype)
        pool.free.extend(blk for t in tables for blk in t)


@gpu
@needs_gpu
def test_decode_and_prefill_do_not_sync_the_host():
    gen = torch.Generator().manual_seed(4)
    pool = Pool(4, 64, 16, 128, torch.bfloat16, gen)
    lens = [300, 45]
    tables = [pool.sequence(n) for n in lens]
    q = torch.randn(2, 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    table, ctx = _table(tables), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    batch = A.prefill_batch([0], [2], [45], [tables[1]], DEVICE)
    # compile, and build the prefill tile table (a host-to-device copy, once per step)
    A.paged_decode_attention(q, pool.k, pool.v, table, ctx, 0.1, 4)
    A.paged_decode_attention(q, pool.k, pool.v, table, ctx, 0.1, 1)
    A.paged_prefill_attention(q, pool.k, pool.v, batch, 0.1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        A.paged_decode_attention(q, pool.k, pool.v, table, ctx, 0.1, 4)
        A.paged_decode_attention(q, pool.k, pool.v, table, ctx, 0.1, 1)
        A.paged_prefill_attention(q, pool.k, pool.v, batch, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@needs_gpu
def test_decode_qwen3_coder_shapes_bf16():
    """The production shape: Hq 32, Hk 4, D 128, 16-token blocks, the default split heuristic."""
    gen = torch.Generator().manual_seed(6)
    lens = [1, 16, 511, 2049, 0, 77]
    pool = Pool(4, sum(-(-n // 16) for n in lens) + 2, 16, 128, torch.bfloat16, gen)
    tables = [pool.sequence(n) for n in lens]
    q = torch.randn(len(lens), 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    splits = A.decode_splits(len(lens), 4, max(lens))
    out = A.paged_decode_attention(q, pool.k, pool.v, _table(tables), torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                                   128 ** -0.5, splits)
    qd = q.double().cpu()
    ref = torch.cat([_attend(qd[i:i + 1], *pool.keys(tables[i], n), 128 ** -0.5) for i, n in enumerate(lens)])
    _close(out, ref, torch.bfloat16)
