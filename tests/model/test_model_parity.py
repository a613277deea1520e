"""The model runtime against transformers on every backend: logits and every layer's hidden state,
float32 (the torch reference, the CPU kernels, and the CUDA backend's Triton kernels, which run in
Triton's interpreter on a machine without a GPU)."""

import pytest
import torch

from conftest import BACKENDS, DEVICE, FAMILIES
from mesh.model.attention import AttentionMetadata, KVCache, PrefillChunk
from mesh.model.backend import make_backend
from mesh.model.linear_attention import StatePool
from mesh.model.loader import load_model
from mesh.parallel.local import LocalDispatcher


def _load(path, dtype, backend):
    from mesh.config import ModelConfig
    eps = ModelConfig.from_dir(path).rms_norm_eps
    return load_model(path, dtype, DEVICE, backend=make_backend(backend, DEVICE, eps))


def _forward(model, experts, ids, block_size=16, capture=None, chunks=None):
    """Run `ids` through the runtime as one or more prefill chunks over a shuffled block table."""
    cfg = model.cfg
    n = len(ids)
    nblocks = -(-n // block_size)
    dev = model.device
    states = None
    if cfg.num_linear_layers:  # hybrid: one recurrent-state slot (slot 1 of 2) for this sequence
        states = StatePool(cfg.num_linear_layers, 2, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim,
                           cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim, dev)
    kv = KVCache(cfg.num_kv_layers, nblocks + 3, block_size, cfg.num_kv_heads, cfg.head_dim, model.dtype, dev,
                 states=states)
    blocks = torch.randperm(nblocks + 3)[:nblocks].to(dev)  # non-contiguous on purpose
    pos = torch.arange(n, device=dev)
    slots = blocks[pos // block_size] * block_size + pos % block_size
    dispatcher = LocalDispatcher(experts, cfg.num_experts)
    outs = []
    chunks = chunks or [n]
    start = 0
    for c in chunks:
        sl = slice(start, start + c)
        meta = AttentionMetadata(slot_mapping=slots[sl],
                                 prefills=[PrefillChunk(0, c, start + c, blocks[:-(-(start + c) // block_size)])],
                                 state_slots=[1])
        outs.append(model.forward(torch.tensor(ids[sl], device=dev), pos[sl], meta, kv, dispatcher, capture=capture))
        start += c
    return model.logits(torch.cat(outs)).cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block_size", [16, 4])  # 16: the native CPU prefill kernel; 4: its torch path
def test_logits_and_hidden_states_match_transformers(family, block_size, backend, hf_checkpoints, hf_models):
    model, experts = _load(hf_checkpoints[family], torch.float32, backend)
    ids = torch.randint(0, model.cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf_models[family](torch.tensor([ids]), output_hidden_states=True)
    captured = []
    logits = _forward(model, experts, ids, block_size=block_size, capture=captured)
    torch.testing.assert_close(logits, ref.logits[0], atol=1e-4, rtol=1e-4)
    # HF's hidden_states[i + 1] is the residual stream after layer i (the last one is normed)
    for i in range(model.cfg.num_layers - 1):
        torch.testing.assert_close(captured[i].cpu(), ref.hidden_states[i + 1][0], atol=1e-4, rtol=1e-4)
    assert logits.abs().max() > 1.0  # the model is not degenerate: the comparison means something


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_gives_the_same_logits(family, backend, hf_checkpoints):
    model, experts = _load(hf_checkpoints[family], torch.float32, backend)
    ids = list(range(5, 45))
    whole = _forward(model, experts, ids)
    chunked = _forward(model, experts, ids, chunks=[7, 1, 16, 16])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda" or DEVICE.startswith("cuda")])
def test_bfloat16_stays_close_to_float32(backend, hf_checkpoints):
    """(bf16 through Triton's interpreter is not meaningful: the cuda backend's bf16 runs on a GPU.)"""
    d = hf_checkpoints["qwen3_moe"]
    m32, e32 = _load(d, torch.float32, backend)
    m16, e16 = _load(d, torch.bfloat16, backend)
    ids = list(range(3, 40))
    a = _forward(m32, e32, ids)
    b = _forward(m16, e16, ids)
    assert b.dtype == torch.float32
    # bf16 keeps ~3 significant digits; the argmax should agree on nearly every position
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_matches_the_torch_backend(family, dtype, hf_checkpoints):
    """The CPU kernels against the torch ops they replace, for every family (dense layers, shared
    experts, qkv biases, routers too narrow for the packed kernel), chunked: float32 to summation
    order, bf16 to within a few rounding steps of the logits' scale."""
    if DEVICE != "cpu":
        pytest.skip("the cpu backend runs CPU tensors")
    ids = torch.randint(0, 128, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    outs = {}
    for backend in ("cpu", "torch"):
        model, experts = _load(hf_checkpoints[family], dtype, backend)
        outs[backend] = _forward(model, experts, ids, chunks=[20, 1, 16])
    fast, ref = outs["cpu"], outs["torch"]
    assert fast.abs().max() > 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    else:
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        assert ((fast - ref).abs().max() / ref.abs().max()) < 0.05
