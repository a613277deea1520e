"""The prefix cache's tiers beyond the local block pool, bridged to the block manager they extend
(Redis at the edge implements the tier, `mesh.cache.tier.PrefixTier`).

Lookup order on admission: local blocks (BlockManager.match_prefix), then the tier for the following
full blocks of the prompt, then compute. Blocks that a step completes are copied out of the pool at
once (a memcpy, so the block may be reused right after) and encoded and written by a background
thread: tier writes never sit on the step's path.

Hybrid models (linear-attention layers) also store the recurrent-state snapshot taken at a block's
end, under a key derived from the block's hash, with the same codec and checksum; a prefix restored
from the tier then ends at the last block whose KV and snapshot both came back intact.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import struct
import threading
import weakref

import torch

from mesh.cache.codec import decode_block, encode_block
from mesh.cache.tier import PrefixTier
from mesh.engine.block_manager import BlockManager, block_hash
from mesh.engine.sequence import Sequence
from mesh.model.attention import KVCache

log = logging.getLogger("mesh.cache")


def state_key(block_hash: int) -> int:
    """The tier key of the state snapshot at the end of the block with this hash."""
    digest = hashlib.blake2b(b"state:" + struct.pack("<Q", block_hash), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TieredPrefixCache:
    def __init__(self, tier: PrefixTier, blocks: BlockManager, kv: KVCache, max_queued_blocks: int = 4096):
        self.tier = tier
        self.blocks = blocks
        self.kv = kv
        self.block_shape = kv.block_shape  # [L, 2, block_size, Hk, D]: one block's K and V, all layers
        self.states = kv.states  # hybrid models' state pool (snapshot slots), else None
        if self.states is not None:  # a snapshot travels as one float32 vector: conv then delta-rule states
            self.conv_shape, self.ssm_shape = self.states.conv.shape[2:], self.states.ssm.shape[2:]
            n = self.states.num_layers * (self.conv_shape.numel() + self.ssm_shape.numel())
            self.state_shape = (1, 1, 1, 1, n)
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
        hybrid = self.states is not None
        keys = hashes + ([state_key(h) for h in hashes] if hybrid else [])
        payloads = self.tier.get_many(keys)
        blocks = []
        for h, payload in zip(hashes, payloads):
            kv = self._decode(h, payload, self.kv.pool.dtype, self.block_shape)
            if kv is None:
                break
            blocks.append((h, kv))
        snapshot = None
        if hybrid:  # the prefix ends at the last block that also has its state snapshot
            snaps = payloads[len(hashes):]
            while blocks and snapshot is None:
                h = blocks[-1][0]
                snapshot = self._decode(state_key(h), snaps[len(blocks) - 1], torch.float32, self.state_shape)
                if snapshot is None:
                    blocks.pop()
        if not blocks or not self.blocks.allocate(seq, len(blocks) * bs):
            return 0
        if snapshot is not None:
            slot = self.blocks.states.take_snapshot_slot()
            if slot is None:  # no snapshot slot at all: the state cannot be restored
                self.blocks.release(seq)
                return 0
            self._write_state(slot, snapshot.view(-1))
            self.blocks.states.publish(blocks[-1][0], slot)
            seq.state_init = slot
        for i, (h, kv) in enumerate(blocks):
            block = seq.block_ids[first + i]
            self.kv.write_block(block, kv)
            self.blocks.register(seq, block, h)
        added = len(blocks) * bs
        seq.num_computed_tokens += added
        return added

    def _decode(self, key: int, payload: bytes | None, dtype: torch.dtype, shape) -> torch.Tensor | None:
        if payload is None:
            return None
        value = decode_block(payload, dtype, shape)
        if value is None:  # corrupt or truncated: drop it so nobody trips on it again
            self.tier.stats.corrupt += 1
            self.tier.delete(key)
        return value

    def _write_state(self, slot: int, flat: torch.Tensor) -> None:
        layers, cn = self.states.num_layers, self.conv_shape.numel()
        per = flat.view(layers, -1)
        self.states.write(slot, per[:, :cn].reshape(layers, *self.conv_shape),
                          per[:, cn:].reshape(layers, *self.ssm_shape))

    # ---- write: after a step, off the hot path ------------------------------------------
    def store(self, seq: Sequence, indices: list[int]) -> None:
        """Queue the blocks `seq.block_ids[i]` for i in `indices` (just hashed) for the tier, with
        their state snapshots where a hybrid model took one."""
        items = []
        for i in indices:
            h = seq.block_hashes[i]
            items.append((h, self.kv.read_block(seq.block_ids[i]).cpu()))  # [L, 2, bs, Hk, D], a copy
            slot = self.blocks.states.lookup(h) if self.states is not None else None
            if slot is not None:
                conv, ssm = self.states.read(slot)  # copies
                flat = torch.cat([conv.flatten(1), ssm.flatten(1)], dim=1).cpu()  # [L, conv + ssm]
                items.append((state_key(h), flat.view(self.state_shape)))
        for item in items:
            try:
                self._queue.put_nowait(item)
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
