"""The bridge between the local block pool and a remote tier (Redis at the edge).

Lookup order on admission: local blocks (BlockManager.match_prefix), then the tier for the following
full blocks of the prompt, then compute. Blocks that a step completes are copied out of the pool at
once (a memcpy, so the block may be reused right after) and encoded and written by a background
thread: tier writes never sit on the step's path.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref

import torch

from mesh.cache.codec import decode_block, encode_block
from mesh.cache.tier import PrefixTier
from mesh.engine.block_manager import BlockManager, block_hash
from mesh.engine.sequence import Sequence
from mesh.model.attention import KVCache

log = logging.getLogger("mesh.cache")


class TieredPrefixCache:
    def __init__(self, tier: PrefixTier, blocks: BlockManager, kv: KVCache, max_queued_blocks: int = 4096):
        self.tier = tier
        self.blocks = blocks
        self.kv = kv
        self.block_shape = kv.block_shape  # [L, 2, block_size, Hk, D]: one block's K and V, all layers
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_blocks)
        self._stop = threading.Event()
        # The writer thread sees only the queue and the tier, never this object or the KV pool, so an
        # engine that is dropped without close() is still freed (and its writer told to stop).
        self._writer = threading.Thread(target=_write_loop, args=(self._queue, tier, self._stop),
                                        name="mesh-prefix-writer", daemon=True)
        self._writer.start()
        weakref.finalize(self, self._stop.set)

    # ---- read: on admission, after the local match --------------------------------------
    def fetch(self, seq: Sequence) -> int:
        """Extend `seq`'s cached prefix from the tier; returns the tokens added."""
        if not (self.blocks.enable_prefix_caching and seq.request.use_prefix_cache):
            return 0
        bs = self.blocks.block_size
        first, limit = len(seq.block_hashes), (len(seq.token_ids) - 1) // bs
        if first >= limit:
            return 0
        ns = self.blocks.namespace_of(seq)
        hashes, parent = [], seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(first, limit):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], ns)
            hashes.append(parent)
        payloads = self.tier.get_many(hashes)
        blocks = []
        for h, payload in zip(hashes, payloads):
            if payload is None:
                break
            kv = decode_block(payload, self.kv.pool.dtype, self.block_shape)
            if kv is None:  # corrupt or truncated: drop it so nobody trips on it again
                self.tier.stats.corrupt += 1
                self.tier.delete(h)
                break
            blocks.append((h, kv))
        if not blocks or not self.blocks.allocate(seq, len(blocks) * bs):
            return 0
        for i, (h, kv) in enumerate(blocks):
            block = seq.block_ids[first + i]
            self.kv.write_block(block, kv)
            self.blocks.register(seq, block, h)
        added = len(blocks) * bs
        seq.num_computed_tokens += added
        return added

    # ---- write: after a step, off the hot path ------------------------------------------
    def store(self, seq: Sequence, indices: list[int]) -> None:
        """Queue the blocks `seq.block_ids[i]` for i in `indices` (just hashed) for the tier."""
        for i in indices:
            kv = self.kv.read_block(seq.block_ids[i])  # [L, 2, bs, Hk, D], a copy
            try:
                self._queue.put_nowait((seq.block_hashes[i], kv))
            except queue.Full:
                self.tier.stats.dropped_writes += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued writes are handed to the tier (tests, shutdown)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self) -> None:
        self.flush(2.0)
        self._stop.set()
        self._writer.join(timeout=2.0)
        self.tier.close()


def _write_loop(q: queue.Queue, tier: PrefixTier, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            first = q.get(timeout=0.2)
        except queue.Empty:
            continue
        batch = [first]
        while len(batch) < 64:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                break
        try:
            tier.put_many([(h, encode_block(kv)) for h, kv in batch])
        except Exception as e:  # a tier must not raise, but a writer thread must never die
            log.warning("prefix tier write failed: %s", e)
        for _ in batch:
            q.task_done()
