"""The paged KV cache, a step's attention metadata, and attention over the cache in torch ops (the
reference every backend's kernels are checked against).

The KV pool of one layer is `k, v: [kv_heads, num_blocks, block_size, head_dim]`: head-major, so that
a block of one head is one contiguous [block_size, head_dim] tile (what a kernel loads in one go) and
gathering a sequence's blocks with one `index_select` per head yields each head's keys as one
contiguous [tokens, head_dim] matrix. A step's tokens are laid out decode rows first (one token per
decoding sequence), then each prefill chunk in turn. Decode rows attend in one batched call over a
padded block table; each prefill chunk attends over its own context (cached prefix + earlier chunks
+ itself) with a causal offset.
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
    """Where a step's tokens go and what they attend to, prepared by the runner before the forward
    pass. Backends derive their own per-step arguments from it once per step (`begin_step`), never
    per layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat pool slot (block * block_size + offset) per new token; < 0: none
    num_decode: int = 0
    decode_block_table: torch.Tensor | None = None  # [B, max_blocks] int32/int64, padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [B] int32/int64: tokens each decode row attends to
    prefills: list[PrefillChunk] = field(default_factory=list)
    # An upper bound of the decode rows' context lengths, known on the host (the CUDA backend sizes its
    # split of long contexts by it); 0: unknown (the pool's per-sequence limit is used)
    max_decode_context: int = 0
    # Hybrid models (linear-attention layers): each decode row's and then each prefill chunk's slot in
    # the state pool (host ints, and the decode rows' as a device tensor), and per prefill chunk the
    # snapshots to take: (tokens of the chunk after which, snapshot slot).
    state_slots: list[int] = field(default_factory=list)
    decode_state_slots: torch.Tensor | None = None  # [B] int64
    snapshots: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        return not self.prefills


class KVCache:
    """The paged pool: one K and one V tensor per layer, each [kv_heads, num_blocks, block_size, head_dim],
    and, for hybrid models, the linear-attention layers' state pool beside it (`states`)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", states=None):
        shape = (num_layers, 2, kv_heads, num_blocks, block_size, head_dim)
        self.pool = torch.empty(shape, dtype=dtype, device=device)
        self.huge_pages = False
        if self.pool.device.type == "cpu":
            from mesh.model.cpu.native import advise_huge_pages
            self.huge_pages = advise_huge_pages(self.pool)  # before the zeroing faults the pages in
        self.pool.zero_()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._layers = [(self.pool[i, 0], self.pool[i, 1]) for i in range(num_layers)]  # views, made once
        self.states = states  # mesh.model.linear_attention.StatePool or None

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


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k, v [T, Hk, D] into their pool slots (caches [Hk, N, bs, D]); rows with a negative slot are not
    written (the padding rows of a fixed-size batch)."""
    hk, _, _, d = k_cache.shape
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(hk, -1, d).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(hk, -1, d).index_copy_(1, slot_mapping, v.transpose(0, 1))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D] (the step's new K/V already in the cache); caches: [Hk, N, bs, D] -> [T, Hq * D].

    Decode rows (the first meta.num_decode) in one batched call, then each prefill chunk with SDPA
    over its gathered context; `out` [T, Hq, D] receives them when given."""
    t, hq, d = q.shape
    nd = meta.num_decode
    out = torch.empty_like(q) if out is None else out
    if nd:
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens,
                                    scale)
    prefill_attention(q, k_cache, v_cache, meta.prefills, scale, out)
    return out.view(t, hq * d)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks: list[PrefillChunk],
                      scale: float, out: torch.Tensor) -> None:
    """Each chunk's rows of q [T, Hq, D] attend causally to their sequence's context; written to out."""
    for chunk in chunks:
        s, n, ctx = chunk.start, chunk.length, chunk.context_len
        # 4-D inputs: with 3-D ones SDPA leaves its fused CPU kernel for the unfused math path.
        qp = q[s:s + n].transpose(0, 1)[None]  # [1, Hq, n, D]
        kp = gather_blocks(k_cache, chunk.block_ids)[None, :, :ctx]  # [1, Hk, ctx, D]
        vp = gather_blocks(v_cache, chunk.block_ids)[None, :, :ctx]
        if ctx == n:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # query i sits at absolute position ctx - n + i and sees keys 0 ..= that position
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:s + n] = op[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence) over each sequence's padded blocks -> [B, Hq, D].

    Plain batched matmuls over (kv head, sequence) pairs: the query heads of one KV group are that
    pair's query rows, so K/V are never repeated. Padding past a sequence's length gets -inf before
    the softmax; a row with no context at all (a padding row) gets zeros.
    """
    b, hq, d = q.shape
    hk = k_cache.shape[0]
    g = hq // hk
    table = table.to(torch.int64)
    span = torch.arange(table.shape[1] * k_cache.shape[2], device=q.device)  # [M*bs] token positions
    mask = (span[None, :] < context_lens.to(q.device)[:, None])[:, None, :]  # [B, 1, M*bs]
    bias = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
    flat = table.reshape(-1)
    kd = gather_blocks(k_cache, flat).view(hk * b, -1, d)  # [Hk*B, M*bs, D]
    vd = gather_blocks(v_cache, flat).view(hk * b, -1, d)
    qd = q.view(b, hk, g, d).transpose(0, 1).reshape(hk * b, g, d)  # [Hk*B, G, D]
    # Scores come out of the matmul in the model dtype, then scale, mask and softmax run in float32:
    # transformers' eager attention does the same.
    scores = torch.bmm(qd, kd.transpose(1, 2)).view(hk, b, g, -1)  # [Hk, B, G, M*bs]
    scores = scores.to(torch.float32).mul_(scale).add_(bias)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(q.dtype).view(hk * b, g, -1)
    o = torch.bmm(probs, vd)  # [Hk*B, G, D]
    return o.view(hk, b, g, d).transpose(0, 1).reshape(b, hq, d)
