"""The paged KV cache's bookkeeping: block allocation, reference counts and prefix sharing.

A block holds `block_size` consecutive tokens of one sequence. A full block is identified by a chained
hash: hash(parent block's hash, the block's token ids), started from a namespace (model fingerprint,
tenant salt), so equal hashes mean equal prefixes in the same namespace. Blocks whose reference
count falls to zero stay cached (keyed by hash) on an LRU free list until they are reused for new
data. Nothing here grows beyond the pool: the hash index holds at most one entry per block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from mesh.engine.sequence import Sequence
from mesh.engine.state_cache import StateCache


def block_hash(parent: int | None, tokens: list[int], namespace: str) -> int:
    """A stable 64-bit chained hash (the same in every process, unlike Python's salted hash)."""
    h = hashlib.blake2b(digest_size=8)
    if parent is None:
        h.update(b"ns:" + namespace.encode())
    else:
        h.update(struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return int.from_bytes(h.digest(), "little")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 namespace: str = "", states: StateCache | None = None):
        """`states`: the recurrent-state slots of a hybrid model; a cached prefix then ends where its
        last block has a state snapshot."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        # Unreferenced blocks, least recently freed first; cached ones keep their hash until reused.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0  # tokens served from cached blocks since start
        self.prefix_queries = 0  # prompt tokens looked up since start
        self.states = states

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    def namespace_of(self, seq: Sequence) -> str:
        return f"{self.namespace}|{seq.request.cache_salt}"

    def match_prefix(self, seq: Sequence) -> int:
        """On first admission: take cached blocks for the longest cached prefix of full blocks.

        At least one prompt token is always left to compute, since its logits start the output.
        Returns the number of tokens served from cache.
        """
        if not (self.enable_prefix_caching and seq.request.use_prefix_cache):
            return 0
        bs = self.block_size
        limit = (len(seq.token_ids) - 1) // bs
        parent, ns = None, self.namespace_of(seq)
        self.prefix_queries += len(seq.token_ids)
        found: list[tuple[int, int]] = []  # (block, hash) of the cached prefix
        for i in range(limit):
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], ns)
            block = self.block_of_hash.get(h)
            if block is None:
                break
            found.append((block, h))
            parent = h
        if self.states is not None:  # hybrid: only up to the last block with a state snapshot
            while found and self.states.lookup(found[-1][1]) is None:
                found.pop()
            if found:
                seq.state_init = self.states.lookup(found[-1][1])
        for block, h in found:
            self._ref(block)
            seq.block_ids.append(block)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_ids) * bs
        self.prefix_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and no change) if the pool is short."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.hash_of[block]
            if old is not None:  # reusing a cached block: its old content is gone
                if self.block_of_hash.get(old) == block:
                    del self.block_of_hash[old]
                    if self.states is not None:
                        self.states.forget(old)
                self.hash_of[block] = None
            self.ref_count[block] = 1
            seq.block_ids.append(block)
        return True

    def commit(self, seq: Sequence) -> list[int]:
        """After a step: hash the blocks that became full, so later prompts can share them.
        Returns the indices (into seq.block_ids) of the blocks hashed now."""
        if not (self.enable_prefix_caching and seq.request.use_prefix_cache):
            return []
        bs = self.block_size
        first = len(seq.block_hashes)
        full = seq.num_computed_tokens // bs
        if full <= first:  # most decode steps: no block filled
            return []
        ns = self.namespace_of(seq)
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], ns)
            seq.block_hashes.append(h)
            if h not in self.block_of_hash:
                self.block_of_hash[h] = seq.block_ids[i]
                self.hash_of[seq.block_ids[i]] = h
            snapshot = seq.pending_snapshots.pop(i, None)
            if snapshot is not None:  # the state at this block's end, taken during the step
                self.states.publish(h, snapshot)
        return list(range(first, full))

    def register(self, seq: Sequence, block: int, h: int) -> None:
        """A block of `seq` filled from another tier: index it like a computed one."""
        seq.block_hashes.append(h)
        if h not in self.block_of_hash:
            self.block_of_hash[h] = block
            self.hash_of[block] = h

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Let `child` (a further completion of the same prompt, not yet scheduled) start from the first
        `num_blocks` blocks `parent` has computed: shared by reference, not copied. The child then
        computes only the tokens after them. A hybrid model's child needs the recurrent state at that
        point too: it shares only up to the last of those blocks with a state snapshot (and starts from
        that snapshot), or nothing."""
        if self.states is not None:
            while num_blocks and (num_blocks > len(parent.block_hashes)
                                  or self.states.lookup(parent.block_hashes[num_blocks - 1]) is None):
                num_blocks -= 1
            if num_blocks:
                child.state_init = self.states.lookup(parent.block_hashes[num_blocks - 1])
        blocks = parent.block_ids[:num_blocks]
        for block in blocks:
            self._ref(block)
        child.block_ids = list(blocks)
        child.block_hashes = parent.block_hashes[:num_blocks]
        child.num_computed_tokens = len(blocks) * self.block_size

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references (finish, abort or preemption)."""
        # Free in reverse so a prompt's tail blocks are evicted before its shared head.
        for block in reversed(seq.block_ids):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        if self.states is not None:
            self.states.release(seq)

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1
