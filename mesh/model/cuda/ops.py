"""Small fused kernels of the CUDA backend: the residual add with RMSNorm, the router, and the
experts' load counters.

Each replaces a chain of torch ops (three to six launches) with one, which matters most where
launches dominate: a decode step of a 48-layer model runs these about 200 times. They keep the
reference's rounding points (the torch backend's spelling of transformers' arithmetic) and compute
in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(h_ptr, delta_ptr, w_ptr, x_ptr, n_cols, stride_h, stride_d, stride_x, eps,
                         HAS_DELTA: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row: h += delta (rounded once, as torch's add), x = w * norm(h)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    xn = hf * rstd
    if ROUND_FIRST:  # a weight in the model dtype: the reference rounds the normalised value first
        xn = xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * stride_x + cols, (xn * w).to(x_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, H] (updated in place: h += delta) -> (h, rms_norm(h) * weight) in one launch. A float32
    weight with a lower-precision h (zero-centred norms, loaded as 1 + w) scales in float32 and rounds
    once, as `mesh.model.layers.rms_norm` does."""
    t, n = h.shape
    x = torch.empty_like(h)
    if t == 0:
        return h, x
    if delta is not None and delta.stride(-1) != 1:
        delta = delta.contiguous()
    _add_rms_norm_kernel[(t,)](h, delta if delta is not None else h, weight, x, n, h.stride(0),
                               delta.stride(0) if delta is not None else 0, x.stride(0), eps,
                               HAS_DELTA=delta is not None,
                               ROUND_FIRST=weight.dtype != torch.float32 or h.dtype == torch.float32,
                               BLOCK=triton.next_power_of_2(n),
                               num_warps=4 if n <= 4096 else 8)
    return h, x


@triton.jit
def _route_kernel(logits_ptr, slots_ptr, ids_ptr, w_ptr, n_experts, stride_l,
                  K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program per token: softmax over the experts in float32, the top K (largest first; ties to
    # the lower expert id), renormalised. A padding row (KV slot < 0) gets ids -1 and weights 0.
    row = tl.program_id(0)
    valid = tl.load(slots_ptr + row) >= 0
    cols = tl.arange(0, BLOCK_E)
    mask = cols < n_experts
    x = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(mask, p / tl.sum(p, axis=0), -1.0)  # padding below every probability
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, cols, BLOCK_E), axis=0)  # the first expert holding the maximum
        top_w = tl.where(kk == j, best, top_w)
        top_i = tl.where(kk == j, idx.to(tl.int64), top_i)
        p = tl.where(cols == idx, -2.0, p)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)
    top_i = tl.where(valid, top_i, -1)
    top_w = tl.where(valid, top_w, 0.0)
    kmask = kk < K
    tl.store(ids_ptr + row * K + kk, top_i, mask=kmask)
    tl.store(w_ptr + row * K + kk, top_w.to(w_ptr.dtype.element_ty), mask=kmask)


def route(logits: torch.Tensor, slot_mapping: torch.Tensor, top_k: int, normalize: bool,
          weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] weights_dtype), one launch;
    rows whose KV slot (slot_mapping [T]) is negative are padding: ids -1, weights 0."""
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, top_k, dtype=weights_dtype, device=logits.device)
    if t == 0:
        return ids, weights
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    _route_kernel[(t,)](logits, slot_mapping, ids, weights, e, logits.stride(0), K=top_k, NORMALIZE=normalize,
                        BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return ids, weights


@triton.jit
def _count_kernel(ids_ptr, load_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
    tl.atomic_add(load_ptr + ids, 1, mask=(offs < n) & (ids >= 0))  # integer adds: exact in any order


def count_experts(topk_ids: torch.Tensor, load: torch.Tensor) -> None:
    """load [E] int64 += rows routed to each expert by topk_ids [T, K]; ids < 0 (padding) skipped."""
    n = topk_ids.numel()
    if n:
        ids = topk_ids.reshape(-1)
        _count_kernel[(triton.cdiv(n, 1024),)](ids, load, n, BLOCK=1024)
