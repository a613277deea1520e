"""The fused MoE kernels (mesh/model/cuda/fused_moe.py) against a float64 reference on the CPU.

The reference runs each (token, k) pair through its expert's three matmuls, one expert at a time.
Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), float32 only and with tiny shapes and tiles; with MESH_TEST_DEVICE=cuda the same
tests run on the GPU, plus bf16, the grouped_mm baseline, production shapes, and the no-sync and
CUDA-graph checks (marked gpu).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE

from mesh.model.cuda import fused_moe as fm

ON_CUDA = DEVICE.startswith("cuda")
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs MESH_TEST_DEVICE=cuda and a CUDA device")

# tl.dot wants every block dimension >= 16; the interpreter's cost grows with the number of programs
TINY = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)


def reference(hidden, w_gate_up, w_down, topk_ids, topk_weights) -> torch.Tensor:
    """float64 on the CPU: for each expert, its pairs' gate, up and down matmuls; weighted sum."""
    x, wgu, wd = (a.detach().cpu() for a in (hidden, w_gate_up, w_down))
    x = x.double()
    ids = topk_ids.cpu().long()
    w = torch.ones(ids.shape, dtype=torch.float64) if topk_weights is None else topk_weights.cpu().double()
    num_experts, inter = wgu.shape[0], wgu.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(num_experts):
        tok, kk = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate_up, down = wgu[e].double(), wd[e].double()  # [2I, H], [H, I]
        xe = x[tok]  # [n, H]
        act = F.silu(xe @ gate_up[:inter].T) * (xe @ gate_up[inter:].T)  # [n, I]
        out.index_add_(0, tok, (act @ down.T) * w[tok, kk, None])
    return out


def rel_err(out, ref) -> float:
    out = out.detach().cpu().double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(t, k, e, h, i, dtype=torch.float32, seed=0, weights_dtype=torch.float32, ids=None):
    """Random inputs drawn on DEVICE (a 3 GB weight set draws in milliseconds there). Weights scaled
    so activations stay O(1); unless given, each token's k distinct experts, as top-k routes."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, device=DEVICE)
    w_gate_up = torch.randn(e, 2 * i, h, generator=g, device=DEVICE) / h ** 0.5
    w_down = torch.randn(e, h, i, generator=g, device=DEVICE) / i ** 0.5
    if ids is None:
        ids = torch.rand(t, e, generator=g, device=DEVICE).argsort(dim=1)[:, :k]
    weights = torch.rand(t, k, generator=g, device=DEVICE)
    return (hidden.to(dtype), w_gate_up.to(dtype), w_down.to(dtype), ids.to(DEVICE, torch.int64),
            weights.to(weights_dtype))


# ---------------------------------------------------------------------------------------------
# moe_align
# ---------------------------------------------------------------------------------------------

def check_align(ids: torch.Tensor, num_experts: int, block_m: int, fused: bool | None) -> None:
    sorted_ids, block_expert, num_padded = fm.moe_align(ids.to(DEVICE), num_experts, block_m, _fused_count=fused)
    flat = ids.reshape(-1).cpu().long()
    n = flat.numel()
    max_padded = n + num_experts * (block_m - 1)
    assert sorted_ids.dtype == block_expert.dtype == num_padded.dtype == torch.int32
    assert sorted_ids.shape == (max_padded,) and num_padded.shape == (1,)
    assert block_expert.shape == (-(-max_padded // block_m),)
    s, b, npad = sorted_ids.cpu().long(), block_expert.cpu().long(), int(num_padded.item())

    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    blocks = (counts + block_m - 1) // block_m
    assert npad == int(blocks.sum()) * block_m
    assert ((s >= 0) & (s <= n)).all()
    assert (s[npad:] == n).all()  # the sentinel past the used length

    placed = s[s < n]
    assert placed.numel() == placed.unique().numel() == int(valid.sum())  # each valid pair once
    assert set(placed.tolist()) == set(valid.nonzero().flatten().tolist())  # ids out of range nowhere

    used = b[:npad // block_m]
    assert (b[npad // block_m:] == -1).all()
    # experts in increasing order, each with exactly ceil(count / block_m) blocks
    assert torch.equal(used, torch.repeat_interleave(torch.arange(num_experts), blocks))
    for blk, e in enumerate(used.tolist()):
        rows = s[blk * block_m:(blk + 1) * block_m]
        real = rows[rows < n]
        assert (flat[real] == e).all()  # homogeneous blocks
        # real pairs first, then sentinel padding; in flat order (stable)
        assert torch.equal(rows[:real.numel()], real) and (rows[real.numel():] == n).all()
        assert torch.equal(real, real.sort().values)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", ["t1", "t3k2", "uneven", "one_expert", "out_of_range", "many_chunks"])
def test_moe_align_invariants(case, fused):
    g = torch.Generator().manual_seed(1)
    e, block_m = 8, 16
    if case == "t1":
        ids = torch.tensor([[5, 2]])
    elif case == "t3k2":
        ids = torch.tensor([[0, 7], [7, 3], [3, 0]])
    elif case == "uneven":  # expert 1 fills two blocks, most experts get nothing
        ids = torch.cat([torch.ones(20, 1, dtype=torch.long), torch.randint(4, 6, (20, 1), generator=g)], 1)
    elif case == "one_expert":
        ids = torch.full((37, 1), 6)
    elif case == "out_of_range":  # the expert-parallel path marks foreign pairs -1; E and above too
        ids = torch.randint(-1, e + 3, (25, 3), generator=g)
    else:  # several programs place pairs and fill blocks (chunks of 256 pairs), 32-row blocks
        ids, block_m = torch.randint(-1, e, (300, 4), generator=g), 32
    check_align(ids.to(torch.int32 if case == "t3k2" else torch.int64), e, block_m, fused)


def test_moe_align_many_experts():
    """512 expert bins (Qwen3-Next), most experts empty, and no pairs at all."""
    g = torch.Generator().manual_seed(2)
    check_align(torch.randint(0, 512, (6, 10), generator=g), 512, 16, None)
    check_align(torch.empty(0, 4, dtype=torch.long), 8, 16, None)


# ---------------------------------------------------------------------------------------------
# fused_experts / grouped_experts against the reference
# ---------------------------------------------------------------------------------------------

CASES = {
    # name: (T, K, E, H, I, config overrides)
    "t1": (1, 2, 8, 32, 16, {}),
    "t3k2": (3, 2, 8, 32, 16, dict(BLOCK_K=32)),
    "rows_span_blocks": (40, 2, 4, 32, 16, dict(GROUP_M=4)),  # ~20 rows per expert: 2 blocks each
    "ragged_dims": (5, 3, 6, 48, 24, dict(BLOCK_K=32, BLOCK_N=16)),  # H % BLOCK_K, I % BLOCK_N != 0
    "down_override": (4, 2, 8, 64, 32, dict(BLOCK_N=32, down=dict(BLOCK_N=16, BLOCK_K=32))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_experts_matches_reference(name):
    t, k, e, h, i, over = CASES[name]
    args = make_inputs(t, k, e, h, i, seed=len(name))
    out = fm.fused_experts(*args, config={**TINY, **over})
    assert out.shape == (t, h) and out.dtype == torch.float32 and out.device.type == DEVICE.split(":")[0]
    assert rel_err(out, reference(*args)) < 1e-4


def test_fused_experts_routing_edge_cases():
    """Empty experts, every token on one expert, ids -1 and >= E ignored, weights in the model
    dtype, and a caller-provided output buffer."""
    t, k, e, h, i = 18, 2, 8, 32, 16
    ids = torch.stack([torch.full((t,), 3), torch.tensor([5, 6] * (t // 2))], 1)  # [T, 2]; 0,1,2,4,7 empty
    ids[2, 1] = -1
    ids[4, 0] = -1
    ids[7, 1] = e  # out of range on the high side
    ids[9] = -1  # a token routed nowhere comes out zero
    hidden, wgu, wd, ids, weights = make_inputs(t, k, e, h, i, seed=3, ids=ids)
    out = torch.full((t, h), float("nan"), device=DEVICE)
    got = fm.fused_experts(hidden, wgu, wd, ids, weights, config=TINY, out=out)
    assert got is out
    ref = reference(hidden, wgu, wd, ids, weights)
    assert rel_err(out, ref) < 1e-4
    assert (out[9] == 0).all()


def test_grouped_experts_matches_reference():
    """Rows in any order through their local slot, unweighted; slot -1 rows come out zero."""
    n, s, h, i = 21, 4, 32, 16
    g = torch.Generator().manual_seed(4)
    slots = torch.randint(-1, s, (n,), generator=g)
    rows, wgu, wd, ids, _ = make_inputs(n, 1, s, h, i, seed=4, ids=slots[:, None])
    out = fm.grouped_experts(rows, wgu, wd, ids.reshape(-1), config=TINY)
    assert out.shape == (n, h)
    assert rel_err(out, reference(rows, wgu, wd, ids, None)) < 1e-4
    assert (out[(slots < 0).to(DEVICE)] == 0).all()


def test_fused_experts_default_config():
    """config=None: the heuristic's tiles (or a table's, on a device that has one)."""
    args = make_inputs(2, 2, 4, 64, 32, seed=5)
    assert rel_err(fm.fused_experts(*args), reference(*args)) < 1e-4


# ---------------------------------------------------------------------------------------------
# get_config
# ---------------------------------------------------------------------------------------------

def test_get_config_reads_the_nearest_bucket(tmp_path):
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    mid = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    big = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, down=dict(BLOCK_N=128))
    name = fm.config_file_name(128, 768, 2048, torch.bfloat16, "NVIDIA H200")
    assert name == "E=128,I=768,H=2048,dtype=bfloat16,device=NVIDIA_H200.json"
    (tmp_path / name).write_text(json.dumps({"2": small, "64": mid, "4096": big}))

    def lookup(tokens, **kw):
        args = dict(num_experts=128, inter=768, hidden=2048, num_tokens=tokens, top_k=8, dtype=torch.bfloat16,
                    device_name="NVIDIA H200", config_dir=tmp_path)
        return fm.get_config(**{**args, **kw})

    assert lookup(1) == small and lookup(20) == small and lookup(40) == mid and lookup(64) == mid
    assert lookup(2000) == mid and lookup(3000) == big and lookup(10 ** 6) == big
    assert lookup(33) == small and lookup(34) == mid  # 33 is 31 from both: a tie goes to the smaller
    # another device, dtype or shape has no table: the heuristic
    for other in (dict(device_name="NVIDIA H100 80GB HBM3"), dict(dtype=torch.float16), dict(inter=512)):
        cfg = lookup(1, **other)
        assert cfg == fm._heuristic_config(128, other.get("inter", 768), 2048, 1, 8, other.get("dtype", torch.bfloat16))


@pytest.mark.parametrize("tokens", [1, 8, 64, 256, 1024, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_heuristic_and_candidates_are_valid(tokens, dtype):
    cfg = fm.get_config(128, 768, 2048, tokens, 8, dtype, "no such device")
    up, down = fm._gemm_params(cfg)
    for p in (up, down):
        assert min(p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_K"]) >= 16 and p["num_warps"] in (2, 4, 8)
    if tokens * 8 <= 16 * 128:  # at most 16 rows per expert on average: decode's 16-row blocks
        assert cfg["BLOCK_M"] == 16
    cands = fm.configs_to_try(tokens, 8, 128)
    assert 0 < len(cands) <= 24
    for c in cands:
        fm._gemm_params(c)


def test_bad_config_is_refused():
    args = make_inputs(1, 2, 8, 32, 16)
    with pytest.raises(ValueError, match=">= 16"):
        fm.fused_experts(*args, config={**TINY, "BLOCK_K": 8})
    with pytest.raises(ValueError, match="lacks"):
        fm.fused_experts(*args, config=dict(BLOCK_M=16))


# ---------------------------------------------------------------------------------------------
# CUDA only: bf16, production shapes, the grouped_mm baseline, no host sync, graph capture
# ---------------------------------------------------------------------------------------------

def production_inputs(t, dtype, e=128, k=8, h=2048, i=768, seed=0):
    return make_inputs(t, k, e, h, i, dtype=dtype, seed=seed, weights_dtype=dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 7, 64, 600])
def test_fused_experts_cuda_production_shapes(t, dtype):
    args = production_inputs(t, dtype, seed=t)
    out = fm.fused_experts(*args)
    assert out.dtype == dtype
    assert rel_err(out, reference(*args)) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("t", [1, 64, 600])
def test_fused_experts_cuda_qwen3_next_shapes(t):
    args = make_inputs(t, 10, 512, 2048, 512, dtype=torch.bfloat16, seed=t)
    assert rel_err(fm.fused_experts(*args), reference(*args)) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("t", [1, 5, 64, 600])
def test_grouped_mm_baseline(t):
    hidden, wgu, wd, ids, weights = production_inputs(t, torch.bfloat16, seed=t)
    ids[0, 0] = -1  # ignored, like the fused path
    out = fm.grouped_mm_experts(hidden, wgu, wd, ids, weights)
    ref = reference(hidden, wgu, wd, ids, weights)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(fm.fused_experts(hidden, wgu, wd, ids, weights), ref) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fn", ["fused_experts", "grouped_mm_experts"])
def test_no_host_sync(fn):
    f = getattr(fm, fn)
    hidden, wgu, wd, ids, weights = production_inputs(64, torch.bfloat16)
    f(hidden, wgu, wd, ids, weights)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = f(hidden, wgu, wd, ids, weights)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rel_err(out, reference(hidden, wgu, wd, ids, weights)) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_follows_new_routing():
    hidden, wgu, wd, ids, weights = production_inputs(16, torch.bfloat16)
    static_ids, static_w = ids.clone(), weights.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) off the capture
        fm.fused_experts(hidden, wgu, wd, static_ids, static_w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.fused_experts(hidden, wgu, wd, static_ids, static_w)
    for seed in (1, 2):
        _, _, _, new_ids, new_w = production_inputs(16, torch.bfloat16, seed=seed)
        new_ids[3, 2] = -1
        static_ids.copy_(new_ids)
        static_w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(hidden, wgu, wd, new_ids, new_w)) < 1e-2
