"""Attention over the paged KV cache.

The KV pool of one layer is `k, v: [num_blocks, block_size, kv_heads, head_dim]`. A step's tokens are
laid out decode rows first (one token per decoding sequence), then each prefill chunk in turn.
Decode rows attend in one batched call over a padded block table; each prefill chunk attends over its
own context (cached prefix + earlier chunks + itself) with a causal offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)


class KVCache:
    """The paged pool: one K and one V tensor per layer."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
        self.pool = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[i, 0], self.pool[i, 1]


def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k_new, v_new: [T, Hk, D]; caches: [N, bs, Hk, D] -> [T, Hq * D].

    Writes the new K/V into their slots first, so every query sees its own token.
    """
    num_blocks, bs, hk, d = k_cache.shape
    k_cache.view(-1, hk, d).index_copy_(0, meta.slot_mapping, k_new)
    v_cache.view(-1, hk, d).index_copy_(0, meta.slot_mapping, v_new)
    t, hq, _ = q.shape
    groups = hq // hk
    out = torch.empty_like(q)

    nd = meta.num_decode
    if nd:
        table = meta.decode_block_table  # [B, M]
        kd = k_cache[table].view(nd, -1, hk, d).transpose(1, 2)  # [B, Hk, M*bs, D]
        vd = v_cache[table].view(nd, -1, hk, d).transpose(1, 2)
        # Query heads of one KV group act as that group's query rows: no K/V repeat needed.
        qd = q[:nd].view(nd, hk, groups, d)  # [B, Hk, G, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.reshape(nd, hq, d)

    for chunk in meta.prefills:
        s, n, ctx = chunk.start, chunk.length, chunk.context_len
        kp = k_cache[chunk.block_ids].view(-1, hk, d)[:ctx].transpose(0, 1)  # [Hk, ctx, D]
        vp = v_cache[chunk.block_ids].view(-1, hk, d)[:ctx].transpose(0, 1)
        qp = q[s:s + n].transpose(0, 1)  # [Hq, n, D]
        if ctx == n:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # query i sits at absolute position ctx - n + i and sees keys 0 ..= that position
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:s + n] = op.transpose(0, 1)
    return out.view(t, hq * d)
