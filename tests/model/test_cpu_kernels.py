"""The CPU backend's kernels and the torch reference's fast paths against simple references: padded-bmm
experts vs a GEMM pair per expert, the gather-and-matmul combine vs a float32 index_add_, decode and
prefill attention over the paged, head-major KV pool vs SDPA over each sequence's own keys; each
through the CPU backend and through the torch backend it falls back to."""

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import native_env

from mesh.model import moe
from mesh.model.attention import AttentionMetadata, KVCache, PrefillChunk, gather_blocks
from mesh.model.backend import TorchBackend
from mesh.model.cpu import native
from mesh.model.cpu.backend import CpuBackend
from mesh.model.layers import RotaryTable, silu_mul
from mesh.model.moe import ExpertShard, ExpertWeights, sort_by_expert, weighted_scatter

H, I, E = 32, 16, 8


def _shard(dtype, seed=0, backend=None):
    g = torch.Generator().manual_seed(seed)
    shard = ExpertShard([ExpertWeights(gate_up=(torch.randn(E, 2 * I, H, generator=g) * 0.2).to(dtype),
                                       down=(torch.randn(E, H, I, generator=g) * 0.2).to(dtype))])
    (backend or TorchBackend()).prepare_experts(shard)
    return shard


def _attend(backend, q, k_cache, v_cache, meta, scale):
    """The backend's attention over the pool for one step's queries q [T, Hq, D] -> [T, Hq * D]."""
    rope = RotaryTable(q.shape[-1], 10000.0, 8, q.dtype)  # unused by attention itself
    step = backend.begin_step(meta, torch.zeros(q.shape[0], dtype=torch.long), rope)
    return backend.attend(step, 0, q, k_cache, v_cache, scale)


def _reference_experts(shard, rows, counts):
    w, out, start = shard.layers[0], [], 0
    for e, c in enumerate(counts):
        x = rows[start:start + c].float()
        out.append(F.linear(silu_mul(F.linear(x, w.gate_up[e].float())), w.down[e].float()))
        start += c
    return torch.cat(out)


def _need_native() -> None:
    if native.library() is None:
        pytest.fail("the native kernels did not build (is a C compiler installed?)")


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Run a test through the CPU backend's kernels and through the torch backend's ops."""
    if request.param == "native":
        _need_native()
        return CpuBackend()
    return TorchBackend()


COUNTS = [
    ([3, 0, 3, 2, 2, 3, 3, 2], True),  # a few rows each, some slots empty
    ([1, 1, 1, 1, 1, 1, 1, 1], True),  # one row each
    ([40, 33, 0, 37, 29, 41, 35, 38], True),  # tens of rows each, one empty
    ([0, 0, 0, 7, 0, 0, 0, 0], False),  # every row to one expert
    ([0, 1, 0, 0, 0, 0, 0, 0], False),  # a single row
    ([90, 10, 0, 5, 60, 3, 0, 1], False),  # skewed: padding would more than double the rows
    ([100, 0, 13, 49, 0, 0, 2, 48], False),  # busy slots in row blocks of 48 (the native kernel's packed path)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts,padded", COUNTS)
def test_expert_paths_match_the_per_expert_reference(dtype, counts, padded, backend, monkeypatch):
    ref = _shard(dtype)
    shard = _shard(dtype, backend=backend)
    rows = torch.randn(sum(counts), H, generator=torch.Generator().manual_seed(1)).to(dtype)
    calls, native_calls = [], []
    real, real_native = moe._padded_experts, native.moe_experts
    monkeypatch.setattr(moe, "_padded_experts", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(native, "moe_experts", lambda *a: native_calls.append(1) or real_native(*a))
    got = shard.forward(0, rows, counts)
    if backend.name == "cpu" and native._vector_kernels(bf16=dtype == torch.bfloat16):
        assert native_calls and not calls and shard.layers[0].gate_up is None  # packed, held once
    elif backend.name == "cpu":  # a CPU with neither AVX-512 (BF16) nor AVX2: the kernel is never offered the rows
        assert shard.layers[0].prepared is None and not native_calls
    else:
        assert not native_calls and bool(calls) == padded
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), _reference_experts(ref, rows, counts), atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_experts_round_like_the_unfused_torch_ops(dtype, monkeypatch):
    """The kernel rounds where torch's ops round (matmul outputs, silu, the product): against the
    torch path it differs by summation order only, far below one bf16 step. Wider than the kernel's
    12-row and 32-column tiles, with empty slots, so every edge of the tiling runs."""
    if not (native.library() is not None and native._vector_kernels(bf16=dtype == torch.bfloat16)):
        pytest.fail("this test needs the native expert kernel: a C compiler and AVX-512 (BF16) or AVX2")
    g = torch.Generator().manual_seed(3)
    h, i, e = 96, 48, 5
    gate_up, down = (torch.randn(e, 2 * i, h, generator=g) * 0.2).to(dtype), (torch.randn(e, h, i, generator=g) * 0.2).to(dtype)
    counts = [25, 0, 12, 1, 13]
    rows = torch.randn(sum(counts), h, generator=g).to(dtype)
    fast = ExpertShard([ExpertWeights(gate_up=gate_up, down=down)])
    CpuBackend().prepare_experts(fast)
    assert fast.layers[0].prepared is not None  # packed at load
    got = fast.forward(0, rows, counts)
    want = ExpertShard([ExpertWeights(gate_up=gate_up, down=down)]).forward(0, rows, counts)  # torch
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # at most one bf16 rounding step apart, and mostly identical
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2 ** -7 + 1e-6).all()
        assert (diff == 0).float().mean() > 0.9



@pytest.mark.parametrize("path", ["tiles", "vdpbf16ps", "wide"])
def test_bf16_expert_and_linear_kernels_match_torch_on_and_off_the_tile_unit(path, monkeypatch):
    """On a CPU with AMX the bf16 expert and linear kernels run their products as tile products (16-row
    blocks padded with zero rows, 32 inputs per step); MESH_NATIVE_AMX=0 keeps them on VDPBF16PS, or with
    MESH_NATIVE_BF16_WIDE=1 on float32 FMAs over operands widened from bf16. All three give torch's
    results to summation order: slots of 1, 15, 16, 17, 31, 33 and 150 rows (row blocks of 48 or, on the
    tile unit, 128, and a remainder), empty slots, one or two 16-row tile blocks, linear layers of 1-100
    rows. Where the CPU has amx_bf16 the tile path must be the one that runs. A CPU without AVX-512 (the
    AVX2 build) has neither tiles nor VDPBF16PS: every setting runs wide there."""
    _need_native()
    if not native._vector_kernels(bf16=True):
        pytest.fail("this test needs AVX-512 BF16 or AVX2")
    native_env(monkeypatch, "MESH_NATIVE_AMX", "1" if path == "tiles" else "0")
    native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", {"tiles": "auto", "vdpbf16ps": "0", "wide": "1"}[path])
    has_amx = "amx_bf16" in native._cpu_flags().split()
    assert native.amx() == (has_amx and path == "tiles")
    if not native._avx512(bf16=True):
        assert native.bf16_products() == "wide"
    elif path == "tiles":  # without AMX: whichever of the other two measured faster here
        assert native.bf16_products() in (("amx",) if has_amx else ("wide", "vdpbf16ps"))
    else:
        assert native.bf16_products() == path
    g = torch.Generator().manual_seed(21)
    h, i, e = 64, 96, 8  # both matmuls' inputs multiples of 32: the tile path's condition
    gate_up = (torch.randn(e, 2 * i, h, generator=g) * 0.2).to(torch.bfloat16)
    down = (torch.randn(e, h, i, generator=g) * 0.2).to(torch.bfloat16)
    from mesh.parallel.local import LocalDispatcher

    def run(native_on: str):
        ops = CpuBackend() if native_on == "1" else TorchBackend()
        shard = ExpertShard([ExpertWeights(gate_up=gate_up, down=down)])
        ops.prepare_experts(shard)
        got = shard.forward(0, rows, counts)
        assert (shard.layers[0].prepared is not None) == (native_on == "1")
        local = ExpertShard([ExpertWeights(gate_up=gate_up, down=down)])
        ops.prepare_experts(local)
        disp = LocalDispatcher(local, e)
        return got, disp.combine(disp.dispatch(0, hidden, ids, weights))

    counts = [1, 15, 0, 16, 17, 31, 33, 150]
    rows = torch.randn(sum(counts), h, generator=g).to(torch.bfloat16)
    t, k = 45, 3  # the one-call local MoE: rows read through the sort, not copied
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, e, (t, k), generator=g)
    ids[:, 0] = 3  # 45+ rows on one slot: two tile blocks
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(torch.bfloat16)
    got, got_moe = run("1")
    want, want_moe = run("0")  # torch ops, rounding where the kernel rounds
    diff = (got.float() - want.float()).abs()  # summation order only: at most one bf16 step apart
    assert (diff <= want.float().abs() * 2 ** -7 + 1e-6).all() and (diff == 0).float().mean() > 0.9
    torch.testing.assert_close(got_moe.float(), want_moe.float(), atol=2e-2, rtol=2e-2)
    w = torch.randn(80, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(80, generator=g).to(torch.bfloat16)
    packed = native.pack_linear(w)
    for m in (1, 16, 17, 33, 100):
        x = torch.randn(m, 96, generator=g).to(torch.bfloat16)
        got, want = native.linear(x, packed, b), F.linear(x, w, b)
        d = (got.float() - want.float()).abs()
        assert (d <= want.float().abs() * 2 ** -7 + 1e-6).all() and (d == 0).float().mean() > 0.95
    # wide inputs: the tile path walks its items in blocks of a few tiles x 32-row chunks (here 2 x 2),
    # each thread one contiguous range of that order; every item once, whatever the thread count
    w = (torch.randn(160, 4096, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(100, 4096, generator=g).to(torch.bfloat16)
    packed = native.pack_linear(w)
    outs = []
    for threads in ("1", "3"):
        native_env(monkeypatch, "MESH_NATIVE_THREADS", threads)
        outs.append(native.linear(x, packed))
    want = F.linear(x, w)
    d = (outs[0].float() - want.float()).abs()
    assert torch.equal(outs[0], outs[1])
    assert (d <= want.float().abs() * 2 ** -7 + 1e-6).all() and (d == 0).float().mean() > 0.9

def test_native_experts_reject_counts_that_do_not_add_up():
    _need_native()
    gate_up, down = torch.zeros(2, 32, 32), torch.zeros(2, 32, 16)
    packed = native.pack_experts(gate_up, down)
    with pytest.raises(ValueError, match="add up"):
        native.moe_experts(torch.zeros(5, 32), [2, 2], packed, 16)


def test_padded_and_loop_paths_agree(monkeypatch):
    shard = _shard(torch.float32)  # the torch backend
    counts = [3, 0, 3, 2, 2, 3, 3, 2]
    rows = torch.randn(sum(counts), H)
    padded = shard.forward(0, rows, counts)
    monkeypatch.setattr(moe, "PAD_ROWS_PER_SLOT", -10_000)  # forces the per-slot loop
    torch.testing.assert_close(shard.forward(0, rows, counts), padded, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights_dtype", [None, torch.float32])
def test_weighted_scatter_matches_float32_index_add(dtype, weights_dtype):
    g = torch.Generator().manual_seed(2)
    t, k = 13, 3
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])  # [T, K]
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(weights_dtype or dtype)
    order, _ = sort_by_expert(ids, E)
    rows = torch.randn(t * k, H, generator=g).to(dtype)  # sorted by expert
    ref = torch.zeros(t, H).index_add_(0, order // k, rows.float() * weights.reshape(-1)[order].float()[:, None])
    got = weighted_scatter(rows, order, weights, t, k)  # float32 unless weights and rows share a dtype
    torch.testing.assert_close(got.float(), ref.to(got.dtype).float(), atol=1e-6, rtol=1e-6)


def _pool(lengths, bs, hk, d, dtype, g):
    """A pool with each sequence's K/V written into shuffled blocks -> kv, [(k [n, Hk, D], v, blocks)]."""
    nblocks = [-(-n // bs) for n in lengths]
    kv = KVCache(1, sum(nblocks) + 2, bs, hk, d, dtype)
    free = torch.randperm(sum(nblocks) + 2, generator=g).tolist()
    seqs = []
    for n, nb in zip(lengths, nblocks):
        blocks = torch.tensor([free.pop() for _ in range(nb)])
        k, v = torch.randn(2, n, hk, d, generator=g).to(dtype)
        pos = torch.arange(n)
        slots = blocks[pos // bs] * bs + pos % bs
        kc, vc = kv.layer(0)
        kc.view(hk, -1, d)[:, slots] = k.transpose(0, 1)
        vc.view(hk, -1, d)[:, slots] = v.transpose(0, 1)
        seqs.append((k, v, blocks))
    return kv, seqs


def test_gather_blocks_returns_each_heads_tokens_in_order():
    g = torch.Generator().manual_seed(3)
    kv, seqs = _pool([37], 4, 2, 8, torch.float32, g)
    k, _, blocks = seqs[0]
    torch.testing.assert_close(gather_blocks(kv.layer(0)[0], blocks)[:, :37], k.transpose(0, 1))


@pytest.mark.parametrize("dtype,wide", [(torch.float32, "auto"), (torch.bfloat16, "0"), (torch.bfloat16, "1")])
@pytest.mark.parametrize("lengths,bs,hk,groups,d", [([1], 16, 2, 4, 32), ([9], 16, 2, 4, 32),
                                                    ([5, 70, 1, 33], 16, 2, 4, 32), ([1000, 3], 16, 2, 4, 32),
                                                    ([33, 100], 16, 2, 4, 64), ([50, 16], 16, 1, 8, 128),
                                                    ([17, 300, 2], 8, 1, 16, 128), ([40, 7], 32, 4, 1, 64)])
def test_decode_attention_matches_sdpa_per_sequence(dtype, wide, lengths, bs, hk, groups, d, backend, monkeypatch):
    """bf16 with its products on VDPBF16PS (MESH_NATIVE_BF16_WIDE=0) and on float32 FMAs over widened keys
    and values (1)."""
    native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", wide)
    g = torch.Generator().manual_seed(4)
    hq = hk * groups
    kv, seqs = _pool(lengths, bs, hk, d, dtype, g)
    b = len(lengths)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    # the last token of every sequence is the one decoding now (its K/V already in the pool)
    width = max(len(blocks) for _, _, blocks in seqs)
    table = [blocks.tolist() + [0] * (width - len(blocks)) for _, _, blocks in seqs]
    slots = [blocks[(n - 1) // bs] * bs + (n - 1) % bs for n, (_, _, blocks) in zip(lengths, seqs)]
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), num_decode=b,
                             decode_block_table=torch.tensor(table), decode_context_lens=torch.tensor(lengths))
    kc, vc = kv.layer(0)
    calls = []
    real = backend.lib.mesh_decode_attention if backend.name == "cpu" else None
    if real is not None:
        monkeypatch.setattr(backend.lib, "mesh_decode_attention", lambda *a: calls.append(1) or real(*a))
    got = _attend(backend, q, kc, vc, meta, d ** -0.5).view(b, hq, d)
    assert bool(calls) == (backend.name == "cpu")  # the kernel ran (not its torch fallback)
    for i, n in enumerate(lengths):
        k, v = seqs[i][0].float(), seqs[i][1].float()  # [n, Hk, D]
        want = F.scaled_dot_product_attention(q[i].float()[:, None], k.transpose(0, 1).repeat_interleave(groups, 0),
                                              v.transpose(0, 1).repeat_interleave(groups, 0), scale=d ** -0.5)
        atol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got[i].float(), want[:, 0], atol=atol, rtol=atol)


@pytest.mark.parametrize("wide", ["0", "1"])
def test_native_decode_threads_give_identical_results(wide, monkeypatch):
    _need_native()
    native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", wide)
    g = torch.Generator().manual_seed(8)
    b, hk, groups, d, bs, m = 9, 2, 4, 64, 16, 20  # 9 x 20 x 2 = 360 block pairs: enough for 2 threads
    k, v = (torch.randn(hk, b * m, bs, d, generator=g).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(b, hk * groups, d, generator=g).to(torch.bfloat16)
    table = torch.randperm(b * m, generator=g).view(b, m)
    lens = torch.randint(1, m * bs + 1, (b,), generator=g)
    one = native.decode_attention(q, k, v, table, lens, 0.125)
    native_env(monkeypatch, "MESH_NATIVE_THREADS", "3")
    assert torch.equal(native.decode_attention(q, k, v, table, lens, 0.125), one)


def test_bf16_wide_setting_is_read_and_a_bad_value_warns(monkeypatch, caplog):
    """MESH_NATIVE_BF16_WIDE picks how bf16 products run off the AMX tiles: 1 wide, 0 VDPBF16PS, auto
    (or unset) measured; anything else is named in a warning and measured like auto. Without AVX-512 (the
    AVX2 build) wide is the only way, whatever the setting."""
    _need_native()
    if not native._vector_kernels(bf16=True):
        pytest.fail("this test needs AVX-512 BF16 or AVX2")
    native_env(monkeypatch, "MESH_NATIVE_AMX", "0")
    for value, want in (("1", "wide"), ("0", "vdpbf16ps" if native._avx512(bf16=True) else "wide")):
        native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", value)
        assert native.bf16_products() == want
    native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", None)
    measured = native.bf16_products()
    assert measured in ("wide", "vdpbf16ps")
    with caplog.at_level("WARNING"):
        native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", "sometimes")
        assert native.bf16_products() == measured
    assert "MESH_NATIVE_BF16_WIDE='sometimes'" in caplog.text


def test_native_kernels_share_torchs_openmp_pool(monkeypatch):
    """Where torch runs on GNU OpenMP (libgomp.so.1, the Linux wheels), the kernel is built against
    that runtime and uses torch's thread count; MESH_NATIVE_THREADS overrides it."""
    _need_native()
    native_env(monkeypatch, "MESH_NATIVE_THREADS", None)
    assert native._openmp == native._shares_torch_openmp()
    if native._openmp:
        assert native._threads() == torch.get_num_threads()
    native_env(monkeypatch, "MESH_NATIVE_THREADS", "3")
    assert native._threads() == 3


def test_native_decode_rejects_indices_outside_the_pool():
    _need_native()
    k = torch.zeros(2, 4, 16, 32)
    q = torch.zeros(1, 8, 32)
    with pytest.raises(ValueError, match="outside"):
        native.decode_attention(q, k, k, torch.tensor([[4]]), torch.tensor([3]), 1.0)  # block 4 of 4
    with pytest.raises(ValueError, match="outside"):
        native.decode_attention(q, k, k, torch.tensor([[1]]), torch.tensor([17]), 1.0)  # 17 > 1 block
    # past the kernel's size limits it declines, and the caller's torch path runs instead
    assert native.decode_attention(torch.zeros(1, 130, 32), k, k, torch.tensor([[1]]), torch.tensor([3]), 1.0) is None


def test_prefill_with_cached_prefix_matches_causal_sdpa():
    g = torch.Generator().manual_seed(5)
    bs, hk, groups, d, past, n = 4, 2, 2, 16, 10, 7
    kv, seqs = _pool([past + n], bs, hk, d, torch.float32, g)
    k_all, v_all, blocks = seqs[0]
    q = torch.randn(n, hk * groups, d, generator=g)
    pos = torch.arange(past, past + n)
    meta = AttentionMetadata(slot_mapping=blocks[pos // bs] * bs + pos % bs,
                             prefills=[PrefillChunk(0, n, past + n, blocks)])
    kc, vc = kv.layer(0)
    got = _attend(TorchBackend(), q, kc, vc, meta, d ** -0.5).view(n, -1, d)
    mask = torch.arange(past + n)[None, :] <= pos[:, None]
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k_all.transpose(0, 1).repeat_interleave(groups, 0),
                                          v_all.transpose(0, 1).repeat_interleave(groups, 0), attn_mask=mask,
                                          scale=d ** -0.5)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_are_held_once_and_unpack_exactly(dtype, monkeypatch):
    """The CPU backend drops the stacked copies where its kernel runs the experts; where the kernel
    declines at run time, its torch path rebuilds the stacked weights bit for bit and gives the same
    outputs as the torch backend."""
    _need_native()
    if not native._vector_kernels(bf16=dtype == torch.bfloat16):
        pytest.skip("no expert kernel for this dtype on this CPU (needs AVX-512 (BF16) or AVX2)")
    shard, ref = _shard(dtype), _shard(dtype)
    counts = [3, 0, 5, 2, 2, 13, 3, 2]
    rows = torch.randn(sum(counts), H, generator=torch.Generator().manual_seed(2)).to(dtype)
    stacked_bytes = shard.nbytes
    CpuBackend().prepare_experts(shard)
    assert shard.layers[0].gate_up is None and shard.nbytes == stacked_bytes
    fast = shard.forward(0, rows, counts)
    gate_up, down = CpuBackend._stacked(shard.layers[0])
    assert torch.equal(gate_up, ref.layers[0].gate_up) and torch.equal(down, ref.layers[0].down)
    monkeypatch.setattr(native, "moe_experts", lambda *a: None)  # the kernel declines: torch ops run
    # the same weights (bit for bit, above) through the same torch ops; oneDNN may still pick another
    # summation order for differently aligned buffers, so not bit-exact
    torch.testing.assert_close(shard.forward(0, rows, counts), ref.forward(0, rows, counts))
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast.float(), ref.forward(0, rows, counts).float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rms_norm_matches_the_torch_spelling(dtype):
    """One pass per row, the same rounding points as weight * F.rms_norm(x.float()).to(dtype): for a
    hidden state, and for per-head q/k weights over a strided view of a fused qkv projection."""
    _need_native()
    g = torch.Generator().manual_seed(5)

    def torch_norm(x, w):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)

    x = (torch.randn(37, 96, generator=g) * 3).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    qkv = torch.randn(5, 8 + 2 * 2, 32, generator=g).to(dtype)
    qk = qkv[:, :10]  # [T, Hq + Hk, D]: rows 384 elements apart, heads 32
    wh = torch.randn(10, 32, generator=g).to(dtype)
    for got, want in ((native.rms_norm(x, w, 1e-6), torch_norm(x, w)), (native.rms_norm(qk, wh, 1e-6), torch_norm(qk, wh))):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        else:  # a summation-order difference may move a value by one bf16 step, rarely
            diff = (got.float() - want.float()).abs()
            assert (diff <= want.float().abs() * 2 ** -7 + 1e-6).all() and (diff == 0).float().mean() > 0.98
    assert native.rms_norm(x.to(torch.float16), w.to(torch.float16), 1e-6) is None  # not a kernel dtype
    with pytest.raises(ValueError, match="weight"):
        native.rms_norm(x, torch.ones(95, dtype=dtype), 1e-6)


@pytest.mark.parametrize("dtype,weights_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_native_local_moe_matches_sort_experts_and_combine(dtype, weights_dtype, monkeypatch):
    """The in-process dispatcher's one-call path (sort by slot, experts reading rows in place, float32
    combine) against its torch path (sort_by_expert, gathered rows, weighted_scatter), with the
    expert-load counters; Qwen's router weights in the model dtype and Mixtral's in float32."""
    from mesh.parallel.local import LocalDispatcher
    _need_native()
    if not native._vector_kernels(bf16=dtype == torch.bfloat16):
        pytest.fail("this test needs AVX-512 (BF16) or AVX2")
    g = torch.Generator().manual_seed(9)
    t, k, h = 61, 3, H
    hidden = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.randint(0, E, (t, k), generator=g)
    ids[:, 0] = 2  # one busy expert: more rows than a row block of the native kernel (48), the rest fewer
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(weights_dtype)
    cpu = CpuBackend()
    fast = LocalDispatcher(_shard(dtype, backend=cpu), E)
    calls = []
    real = cpu.lib.mesh_moe_local
    monkeypatch.setattr(cpu.lib, "mesh_moe_local", lambda *a: calls.append(1) or real(*a))
    got = fast.combine(fast.dispatch(0, hidden, ids, weights))
    assert calls  # the native path ran
    with pytest.raises(ValueError, match="outside"):
        native.moe_local(hidden, torch.full((t, k), E), weights, fast.experts.layers[0].prepared, I)
    slow = LocalDispatcher(_shard(dtype), E)  # the torch backend
    want = slow.combine(slow.dispatch(0, hidden, ids, weights))
    assert got.dtype == want.dtype == dtype
    assert torch.equal(fast.expert_load, slow.expert_load)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)
    fast.combine(fast.dispatch(0, hidden[:7], ids[:7], weights[:7]))  # the kernel adds to the counters
    assert torch.equal(fast.expert_load[0], slow.expert_load[0] + torch.bincount(ids[:7].flatten(), minlength=E))


@pytest.mark.parametrize("dtype,wide", [(torch.float32, "auto"), (torch.bfloat16, "0"), (torch.bfloat16, "1")])
def test_expert_and_linear_kernels_give_the_same_bits_on_any_thread_count(dtype, wide, monkeypatch):
    """Threads take contiguous, cost-balanced ranges of work items: every item must be done exactly once
    whatever the split, so outputs are bit-identical on 1, 2, 3 and 7 threads (busy, idle and single-row
    experts; a busy one in row blocks; linear layers of several row counts). bf16 with its products on
    VDPBF16PS and on the wide float32 kernels (AMX, where the CPU has it, comes first)."""
    _need_native()
    if not native._vector_kernels(bf16=dtype == torch.bfloat16):
        pytest.fail("this test needs AVX-512 (BF16) or AVX2")
    native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", wide)
    g = torch.Generator().manual_seed(5)
    shard = _shard(dtype, backend=CpuBackend())
    packed = shard.layers[0].prepared
    t, k = 37, 3
    hidden = torch.randn(t, H, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype)
    skewed = torch.randint(0, E, (t, k), generator=g)
    skewed[:, 0] = 5  # 37 rows on one expert
    few = torch.tensor([[1, 4, 6]] * t)  # five experts idle
    busy = torch.randint(0, E, (140, k), generator=g)
    busy[:, 1] = 2  # 140 rows: row blocks (48 rows each, 128 on the tile unit), the rest by tile
    w_busy = torch.softmax(torch.randn(140, k, generator=g), -1).to(dtype)
    x_busy = torch.randn(140, H, generator=g).to(dtype)
    lin = native.pack_linear(torch.randn(96, H, generator=g).to(dtype))
    assert packed is not None and lin is not None

    def run():
        out = [native.moe_local(hidden, ids, weights, packed, I)[0] for ids in (skewed, few)]
        out.append(native.moe_local(x_busy, busy, w_busy, packed, I)[0])
        out.append(native.moe_experts(hidden[:13], [0, 1, 0, 12, 0, 0, 0, 0], packed, I))
        out += [native.linear(torch.randn(m, H, generator=torch.Generator().manual_seed(m)).to(dtype), lin)
                for m in (1, 5, 13, 64, 100, 2500)]  # 2500 float32 rows: two L2-sized row blocks
        return out

    native_env(monkeypatch, "MESH_NATIVE_THREADS", "1")
    want = run()
    for n in ("2", "3", "7"):
        native_env(monkeypatch, "MESH_NATIVE_THREADS", n)
        for a, b in zip(run(), want):
            assert torch.equal(a, b), f"{n} threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hk,groups,d", [(2, 4, 64), (1, 8, 128), (4, 1, 32), (2, 3, 64)])
@pytest.mark.parametrize("tiles", ["1", "0", "wide"])
def test_prefill_chunks_match_causal_sdpa(dtype, hk, groups, d, tiles, backend, monkeypatch):
    """A step's prefill chunks (fresh prompts and chunks after a cached prefix, lengths around the
    16-token block and query-tile edges) against SDPA over each sequence, through the native kernel
    (every chunk in one call) and through the torch path. bf16 on a CPU with AMX: the tile path
    (16 query positions x 32 keys per step); with MESH_NATIVE_AMX=0, the VDPBF16PS one, or with
    MESH_NATIVE_BF16_WIDE=1 too, float32 FMAs over keys and values widened from bf16."""
    native_env(monkeypatch, "MESH_NATIVE_AMX", "1" if tiles == "1" else "0")
    native_env(monkeypatch, "MESH_NATIVE_BF16_WIDE", {"1": "auto", "0": "0", "wide": "1"}[tiles])
    if backend.name == "cpu":
        assert native.amx() == (tiles == "1" and "amx_bf16" in native._cpu_flags().split())
    g = torch.Generator().manual_seed(11)
    bs = 16
    spans = [(0, 1), (0, 15), (0, 17), (5, 40), (16, 16), (33, 100)]  # (cached tokens, new tokens)
    kv, seqs = _pool([p + n for p, n in spans], bs, hk, d, dtype, g)
    t = sum(n for _, n in spans)
    q = torch.randn(t, hk * groups, d, generator=g).to(dtype)
    chunks, slots, row = [], [], 0
    for (past, n), (k, v, blocks) in zip(spans, seqs):
        chunks.append(PrefillChunk(row, n, past + n, blocks))
        pos = torch.arange(past, past + n)
        slots.append(blocks[pos // bs] * bs + pos % bs)
        row += n
    calls = []
    real = native.prefill_attention
    monkeypatch.setattr(native, "prefill_attention", lambda *a: calls.append(1) or real(*a))
    meta = AttentionMetadata(slot_mapping=torch.cat(slots), prefills=chunks)
    kc, vc = kv.layer(0)
    got = _attend(backend, q, kc, vc, meta, d ** -0.5).view(t, -1, d)
    ran_native = backend.name == "cpu" and native._vector_kernels(bf16=dtype == torch.bfloat16)
    assert bool(calls) == (backend.name == "cpu")
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    for (past, n), (k, v, _), chunk in zip(spans, seqs, chunks):
        pos = torch.arange(past, past + n)
        mask = torch.arange(past + n)[None, :] <= pos[:, None]
        want = F.scaled_dot_product_attention(
            q[chunk.start:chunk.start + n].float().transpose(0, 1),
            k.float().transpose(0, 1).repeat_interleave(groups, 0),
            v.float().transpose(0, 1).repeat_interleave(groups, 0), attn_mask=mask, scale=d ** -0.5)
        torch.testing.assert_close(got[chunk.start:chunk.start + n].float(), want.transpose(0, 1), atol=atol,
                                   rtol=atol, msg=lambda m: f"chunk {past}+{n} ({'native' if ran_native else 'torch'}): {m}")



def test_bf16_prefill_heads_do_not_see_each_others_values():
    """The tile path takes the values of two key blocks per step; a chunk whose last step has one block
    must not multiply the next KV head's values (here infinite) by its zero probabilities: 0 * inf is
    NaN. Head 0 of a one-block chunk stays finite and equal to SDPA; head 1, whose values hold the
    infinity, is not looked at."""
    _need_native()
    if not native._vector_kernels(bf16=True):
        pytest.fail("this test needs AVX-512 BF16 or AVX2")
    g = torch.Generator().manual_seed(13)
    hk, groups, d, n = 2, 2, 64, 16
    kv, seqs = _pool([n], 16, hk, d, torch.bfloat16, g)
    k, v, blocks = seqs[0]
    kc, vc = kv.layer(0)
    vc[1, blocks[0], 3, 5] = float("inf")
    q = torch.randn(n, hk * groups, d, generator=g).to(torch.bfloat16)
    out = torch.zeros_like(q)
    assert native.prefill_attention(q, kc, vc, [PrefillChunk(0, n, n, blocks)], d ** -0.5, out)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q[:, :groups].float().transpose(0, 1), k[:, :1].float().transpose(0, 1)
                                          .expand(groups, n, d), v[:, :1].float().transpose(0, 1).expand(groups, n, d),
                                          attn_mask=mask, scale=d ** -0.5)
    assert torch.isfinite(out[:, :groups]).all()
    torch.testing.assert_close(out[:, :groups].float(), want.transpose(0, 1), atol=3e-2, rtol=3e-2)

def test_native_prefill_rejects_chunks_outside_their_table():
    _need_native()
    if not native._vector_kernels(bf16=False):
        pytest.fail("this test needs AVX-512 or AVX2")
    k = torch.zeros(2, 4, 16, 32)
    q, out = torch.zeros(20, 8, 32), torch.zeros(20, 8, 32)
    with pytest.raises(ValueError, match="outside"):  # block 4 of a 4-block pool
        native.prefill_attention(q, k, k, [PrefillChunk(0, 20, 20, torch.tensor([0, 4]))], 1.0, out)
    with pytest.raises(ValueError, match="outside"):  # 33 tokens of context in a 2-block table
        native.prefill_attention(q, k, k, [PrefillChunk(0, 20, 33, torch.tensor([0, 1]))], 1.0, out)
    with pytest.raises(ValueError, match="outside"):  # rows past the step's 20
        native.prefill_attention(q, k, k, [PrefillChunk(5, 16, 16, torch.tensor([0]))], 1.0, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 13, 64, 2100])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n", [96, 48, 16])  # 48, 16: the last 32-wide tile half padding (routers)
def test_native_linear_matches_f_linear(dtype, m, with_bias, n):
    """The packed-weight linear kernel (the CPU's dense projections, routers and lm_head): bf16 rounds
    once, as F.linear does, so it matches bit for bit here; float32 to summation order. 2100 rows of 64
    inputs span three of the L2-sized row blocks the VDPBF16PS / FMA path walks (256 KiB of inputs
    each; the last one short)."""
    _need_native()
    g = torch.Generator().manual_seed(12)
    w = torch.randn(n, 64, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    x = torch.randn(m, 64, generator=g).to(dtype)
    packed = native.pack_linear(w)
    if not native._vector_kernels(bf16=dtype == torch.bfloat16):  # no kernel for it here: declined at packing
        assert packed is None
        pytest.skip(f"no {dtype} linear kernel on this CPU (needs AVX-512 (BF16) or AVX2): checked only "
                    "that packing declines it")
    got, want = native.linear(x, packed, b), F.linear(x, w, b)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2 ** -7 + 1e-6).all() and (diff == 0).float().mean() > 0.98
    assert got.shape == (m, n)
    wide = native.linear(x, packed, b, out_float32=True)  # the lm_head's float32 logits in the same pass
    assert wide.dtype == torch.float32 and torch.equal(wide, got.float())
    assert native.pack_linear(torch.zeros(40, 64, dtype=dtype)) is None  # N not a multiple of 16


def test_native_argmax_matches_torch_ties_and_nan_included():
    _need_native()
    g = torch.Generator().manual_seed(13)
    x = torch.randn(9, 1000, generator=g)
    x[1, 10] = x[1, 500] = 50.0  # a tie: the first index
    x[2, :] = float("-inf")  # all -inf: index 0
    x[3, 7] = float("nan")  # NaN beats every number
    x[4, 3] = x[4, 900] = float("nan")  # the first NaN
    x[5, 999] = float("inf")
    x[6] = x[6].round()  # many ties among the largest values
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(native.argmax_rows(x[:, :1]), torch.zeros(9, dtype=torch.int64))
    assert native.argmax_rows(x.to(torch.bfloat16)) is None


@pytest.mark.parametrize("target", [["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
                                    ["-mavx2", "-mfma"], []],
                         ids=["avx512-without-bf16", "avx2", "baseline-x86-64"])
def test_kernels_compile_for_cpus_without_this_ones_features(target, tmp_path):
    """The kernels are built with -march=native on each machine: every source must compile where the
    CPU lacks AVX512-BF16 (fp32 kernels only) or AVX-512 altogether (the portable paths)."""
    import platform
    import shutil
    import subprocess
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 target flags")
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the native kernels"
    flags = [f for f in native._FLAGS if f not in ("-march=native", "-shared")] + ["-fopenmp", "-Werror", "-Wno-psabi"]
    for src in native._SRCS + native._CXX_SRCS:
        r = subprocess.run([cc, *flags, *target, "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{src.name} with {target}:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [19, 300])  # 300 x 64: split over threads
def test_native_add_rms_norm_matches_add_then_norm(dtype, rows):
    _need_native()
    from mesh.model.layers import rms_norm
    g = torch.Generator().manual_seed(14)
    h, delta = (torch.randn(2, rows, 64, generator=g) * 3).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    got_h, got_x = native.add_rms_norm(h, delta, w, 1e-6)
    want_h = h + delta
    assert torch.equal(got_h, want_h)  # one rounding of the float32 sum, as torch's add
    want_x = rms_norm(want_h, w, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got_x, want_x, atol=1e-6, rtol=1e-6)
    else:
        diff = (got_x.float() - want_x.float()).abs()
        assert (diff <= want_x.float().abs() * 2 ** -7 + 1e-6).all() and (diff == 0).float().mean() > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 48])  # 48: not a multiple of 32, the portable path
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("t", [9, 1500])  # 1500 tokens: split over threads
def test_native_qkv_rope_write_matches_norm_rope_then_slot_writes(dtype, d, with_norm, t):
    """The fused projection's q heads normed and rotated into a contiguous q, its k heads normed,
    rotated and written to their pool slots, its v heads copied there: what the torch spelling
    (layers.rms_norm, then layers.rotate, then the slot writes) produces; no other slot changes."""
    _need_native()
    from mesh.model.layers import RotaryTable, rms_norm, rotate
    g = torch.Generator().manual_seed(16)
    hq, hk, bs = 8, 2, 16
    n = -(-t // bs) + 3
    qkv = (torch.randn(t, hq + 2 * hk, d, generator=g) * 2).to(dtype)
    weight = torch.randn(hq + hk, d, generator=g).to(dtype) if with_norm else None
    cos, sin = RotaryTable(d, 10000.0, 4096, dtype).at(torch.randint(0, 4096, (t,), generator=g))
    caches = torch.randn(2, hk, n, bs, d, generator=g).to(dtype)
    slots = torch.randperm(n * bs, generator=g)[:t]
    qk = qkv[:, :hq + hk]
    ref = rotate(rms_norm(qk, weight, 1e-6) if with_norm else qk, cos, sin)  # [t, hq + hk, d]
    want = caches.clone()
    want[0].view(hk, -1, d)[:, slots] = ref[:, hq:].transpose(0, 1)
    want[1].view(hk, -1, d)[:, slots] = qkv[:, hq + hk:].transpose(0, 1)
    k_cache, v_cache = caches[0], caches[1]
    q = native.qkv_rope_write(qkv, hq, weight, cos, sin, 1e-6, k_cache, v_cache, slots)
    assert q.shape == (t, hq, d) and q.is_contiguous()
    for got, ref_ in ((q, ref[:, :hq]), (caches[0], want[0])):
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref_, atol=1e-6, rtol=1e-6)
        else:  # a summation-order difference in the norm may move a normed value by one bf16 step, rarely,
            # which the rotation carries into outputs of any size (x cos - y sin may cancel): bound it by the head's scale
            diff, scale = (got.float() - ref_.float()).abs(), ref_.float().abs().amax(-1, keepdim=True)
            assert (diff <= scale * 2 ** -7 + 1e-6).all() and (diff == 0).float().mean() > 0.98
    assert torch.equal(caches[1], want[1])  # v copied as it is
    untouched = torch.ones(n * bs, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(caches[0].view(hk, -1, d)[:, untouched], want[0].view(hk, -1, d)[:, untouched])
    want = caches.clone()
    with pytest.raises(ValueError, match="outside"):
        native.qkv_rope_write(qkv, hq, weight, cos, sin, 1e-6, k_cache, v_cache, torch.full((t,), n * bs))
    assert torch.equal(caches, want)  # checked before writing anything
    assert native.qkv_rope_write(qkv[:, :-1], hq, weight, cos, sin, 1e-6, k_cache, v_cache, slots) is None


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,top_k", [(16, 4), (60, 4), (128, 8), (128, 2), (512, 8)])  # the last two:
def test_native_routing_picks_torchs_experts_ties_included(logits_dtype, experts, top_k, monkeypatch):  # partial_sort
    """Routing on the CPU backend (the C++ top-k with torch's algorithms, or torch.topk over the logits;
    then the weights in one native pass) picks the same experts in the same order as the torch
    backend, also where bf16 logits tie (rows rounded to integers: many equal values), and its
    weights agree to float32 rounding."""
    _need_native()
    assert hasattr(native.library(), "mesh_route"), "the C++ top-k (csrc/topk.cpp) did not build"
    cpu, ref = CpuBackend(), TorchBackend()
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(300, experts, generator=g) * 3).to(logits_dtype)
    x[:60] = x[:60].round()
    for normalize in (True, False):
        for weights_dtype in (logits_dtype, torch.float32):
            got = cpu.route(None, x, top_k, normalize, weights_dtype)
            want = ref.route(None, x, top_k, normalize, weights_dtype)
            assert torch.equal(got[0], want[0])
            assert got[1].dtype == want[1].dtype
            tol = 2 ** -7 if got[1].dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="outside"):
        native.route_weights(x, torch.full((300, top_k), experts), True, torch.float32)


def _huge_bytes_in(t: torch.Tensor) -> int:
    """AnonHugePages (bytes) of the mappings overlapping t's memory, from /proc/self/smaps (the advice
    splits a mapping at the 2 MiB boundaries)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and lo < b
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def test_kv_pool_and_packed_weights_ask_for_huge_pages(monkeypatch):
    """The KV pool and the packed weights are advised onto transparent huge pages before they are first
    written (decode attention reads 4 KiB blocks scattered over the pool: one TLB miss each on 4 KiB
    pages). Where the kernel's THP mode is `madvise` or `always` the pool's memory must really sit on
    2 MiB pages; MESH_HUGE_PAGES=0 turns the advice off. The pool starts zeroed either way. (Tensors
    of 64 MiB: glibc serves smaller ones, up to its 32 MiB dynamic mmap threshold, from recycled heap
    memory that is already on 4 KiB pages, where the advice changes nothing.)"""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not thp.exists():
        kv = KVCache(2, 2048, 16, 2, 64, torch.float32)
        assert not kv.huge_pages and not kv.pool.any()
        pytest.skip("no transparent huge pages on this system: checked only that the pool starts zeroed "
                    "without them")
    mode = re.search(r"\[(\w+)\]", thp.read_text()).group(1)
    kv = KVCache(2, 2048, 16, 2, 64, torch.float32)  # 64 MiB
    assert kv.huge_pages and not kv.pool.any()
    if mode != "never":
        assert _huge_bytes_in(kv.pool) >= 2 << 20, f"THP mode {mode}: the pool is on 4 KiB pages"
        packed = native._pack(torch.randn(16, 256, 4096))  # 64 MiB
        assert _huge_bytes_in(packed) >= 2 << 20
    monkeypatch.setenv("MESH_HUGE_PAGES", "0")
    kv = KVCache(2, 2048, 16, 2, 64, torch.float32)
    assert not kv.huge_pages and not kv.pool.any()
