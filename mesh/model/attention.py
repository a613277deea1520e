"""Attention over the paged KV cache.

The KV pool of one layer is `k, v: [kv_heads, num_blocks, block_size, head_dim]`: head-major, so that
gathering a sequence's blocks with one `index_select` per head yields each head's keys as one
contiguous [tokens, head_dim] matrix, the layout the matmul kernels want (no transposing copy).
A step's tokens are laid out decode rows first (one token per decoding sequence), then each prefill
chunk in turn. Decode rows attend in one batched call over a padded block table; each prefill chunk
attends over its own context (cached prefix + earlier chunks + itself) with a causal offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mesh.model import native


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the step's token layout
    length: int  # tokens computed now
    context_len: int  # tokens of this sequence in the cache after this step (past + length)
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat pool slot (block * block_size + offset) per new token
    num_decode: int = 0
    decode_block_table: torch.Tensor | None = None  # [B, max_blocks] int64, padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [B] int64: tokens each decode row attends to
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Per-step values every layer shares, derived from the fields above on first use (so callers that
    # build metadata by hand need not know about them).
    decode_bias: torch.Tensor | None = None  # [B, 1, max_blocks * block_size] float32: 0 or -inf
    prefill_spans: tuple[torch.Tensor, torch.Tensor] | None = None  # native.prefill_spans(prefills)


class KVCache:
    """The paged pool: one K and one V tensor per layer, each [kv_heads, num_blocks, block_size, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, 2, kv_heads, num_blocks, block_size, head_dim)
        self.pool = torch.empty(shape, dtype=dtype, device=device)
        self.huge_pages = native.advise_huge_pages(self.pool)  # before the zeroing faults the pages in
        self.pool.zero_()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._layers = [(self.pool[i, 0], self.pool[i, 1]) for i in range(num_layers)]  # views, made once

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[i]

    # Whole-block copies for the remote prefix tier; the payload layout is fixed whatever the pool's.
    @property
    def block_shape(self) -> tuple[int, ...]:
        L, _, hk, _, bs, d = self.pool.shape
        return (L, 2, bs, hk, d)

    def read_block(self, block: int) -> torch.Tensor:
        """A copy of one block's K and V over all layers: [L, 2, block_size, Hk, D]."""
        return self.pool[:, :, :, block].transpose(2, 3).contiguous()

    def write_block(self, block: int, kv: torch.Tensor) -> None:
        """kv [L, 2, block_size, Hk, D] into one block."""
        self.pool[:, :, :, block] = kv.transpose(2, 3).to(self.pool.device)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [Hk, N, bs, D], blocks [n] int64 -> [Hk, n * bs, D] contiguous.

    One dim-0 `index_select` per head over [N, bs * D] rows: a row memcpy per block, several times
    faster than advanced indexing or an `index_select` along dim 1.
    """
    hk, num_blocks, bs, d = cache.shape
    out = cache.new_empty(hk, blocks.numel(), bs * d)
    for h in range(hk):
        torch.index_select(cache[h].view(num_blocks, bs * d), 0, blocks, out=out[h])
    return out.view(hk, -1, d)


def paged_attention(q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k_new, v_new: [T, Hk, D]; caches: [Hk, N, bs, D] -> [T, Hq * D].

    Writes the new K/V into their slots first, so every query sees its own token (k_new, v_new None:
    the caller already wrote them, `native.qkv_rope_write`).
    """
    hk, num_blocks, bs, d = k_cache.shape
    if k_new is not None and not (native.enabled() and native.kv_write(k_cache, v_cache, meta.slot_mapping,
                                                                       k_new, v_new)):
        k_cache.view(hk, -1, d).index_copy_(1, meta.slot_mapping, k_new.transpose(0, 1))
        v_cache.view(hk, -1, d).index_copy_(1, meta.slot_mapping, v_new.transpose(0, 1))
    t, hq, _ = q.shape
    nd = meta.num_decode
    if nd == t and not meta.prefills:  # a decode-only step: the kernel's output is the whole answer
        return _decode_attention(q, k_cache, v_cache, meta, scale).reshape(t, hq * d)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)

    if meta.prefills and native.enabled() and q.device.type == "cpu":
        if meta.prefill_spans is None:
            meta.prefill_spans = native.prefill_spans(meta.prefills)
        if native.prefill_attention(q, k_cache, v_cache, meta.prefills, scale, out, meta.prefill_spans):
            return out.view(t, hq * d)  # the CPU kernel: every chunk at once, K/V read where they lie
    for chunk in meta.prefills:
        s, n, ctx = chunk.start, chunk.length, chunk.context_len
        # 4-D inputs: with 3-D ones SDPA leaves its fused CPU kernel for the unfused math path.
        qp = q[s:s + n].transpose(0, 1)[None]  # [1, Hq, n, D]
        if ctx == n and k_new is not None:
            # no cached prefix: the context is exactly this chunk's new K/V, no need to gather it back
            kp = k_new[s:s + n].transpose(0, 1)[None]  # [1, Hk, n, D]
            vp = v_new[s:s + n].transpose(0, 1)[None]
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # query i sits at absolute position ctx - n + i and sees keys 0 ..= that position
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
            kp = gather_blocks(k_cache, chunk.block_ids)[None, :, :ctx]  # [1, Hk, ctx, D]
            vp = gather_blocks(v_cache, chunk.block_ids)[None, :, :ctx]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:s + n] = op[0].transpose(0, 1)
    return out.view(t, hq * d)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence) over each sequence's padded blocks -> [B, Hq, D].

    On the CPU, with the context lengths known, `native.decode_attention` (float32 scores, online
    softmax, K/V read where they lie). Otherwise plain batched matmuls over (kv head, sequence)
    pairs: the query heads of one KV group are that pair's query rows, so K/V are never repeated.
    Padding past a sequence's length gets -inf before the softmax.
    """
    b, hq, d = q.shape
    hk = k_cache.shape[0]
    g = hq // hk
    table = meta.decode_block_table  # [B, M]
    # The native kernel reads K/V in place (no gather, no padded scores): several times faster.
    out = native.decode_attention(q, k_cache, v_cache, table, meta.decode_context_lens, scale)
    if out is not None:
        return out
    if meta.decode_bias is None:
        span = torch.arange(table.shape[1] * k_cache.shape[2], device=q.device)  # [M*bs] token positions
        mask = (span[None, :] < meta.decode_context_lens[:, None])[:, None, :]  # [B, 1, M*bs]
        meta.decode_bias = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
    flat = table.reshape(-1)
    kd = gather_blocks(k_cache, flat).view(hk * b, -1, d)  # [Hk*B, M*bs, D]
    vd = gather_blocks(v_cache, flat).view(hk * b, -1, d)
    qd = q.view(b, hk, g, d).transpose(0, 1).reshape(hk * b, g, d)  # [Hk*B, G, D]
    # Scores come out of the matmul in the model dtype, then scale, mask and softmax run in float32:
    # transformers' eager attention does the same. (SDPA's CPU kernel keeps float32 scores but, at one
    # query row per head, runs several times slower than these two batched matmuls.)
    scores = torch.bmm(qd, kd.transpose(1, 2)).view(hk, b, g, -1)  # [Hk, B, G, M*bs]
    scores = scores.to(torch.float32).mul_(scale).add_(meta.decode_bias)
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(hk * b, g, -1)
    o = torch.bmm(probs, vd)  # [Hk*B, G, D]
    return o.view(hk, b, g, d).transpose(0, 1).reshape(b, hq, d)
