"""Which slots of the recurrent-state pool hold what (hybrid models: Gated DeltaNet layers).

A hybrid model's sequence has two kinds of cache: paged KV blocks for its full-attention layers, and,
for its linear-attention layers, one fixed-size state (a convolution window and the delta-rule
matrix per layer) that summarises every token so far. The state pool (`mesh.model.linear_attention.
StatePool`) has a slot per running sequence, acquired at admission and released with its blocks, and
snapshot slots: copies of a sequence's state taken where a block boundary of its KV falls, kept per
block hash (LRU). A cached prefix of any block multiple is usable exactly when its last block has a
snapshot: the KV blocks come from the block pool, the state from the snapshot.
"""

from __future__ import annotations

from collections import OrderedDict

from mesh.engine.sequence import Sequence


class StateCache:
    def __init__(self, num_running: int, num_snapshots: int, interval: int = 1):
        """Slots 0..num_running-1 for running sequences, the next num_snapshots for snapshots, taken
        every `interval` blocks (0: none, and hybrid prompts then never hit the prefix cache)."""
        self.num_running, self.num_snapshots, self.interval = num_running, num_snapshots, interval
        self._free_running = list(range(num_running - 1, -1, -1))
        self._free_snapshots = list(range(num_running + num_snapshots - 1, num_running - 1, -1))
        self._snapshot_of: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recent first
        self.snapshots_taken = 0
        self.snapshots_evicted = 0

    @property
    def num_cached_snapshots(self) -> int:
        return len(self._snapshot_of)

    def acquire(self, seq: Sequence) -> None:
        if seq.state_slot < 0:
            if not self._free_running:
                raise RuntimeError("no free state slot: more running sequences than --max-num-seqs")
            seq.state_slot = self._free_running.pop()
            if seq.state_init is None:
                seq.state_init = -1  # starts from zeros

    def release(self, seq: Sequence) -> None:
        """Finish, abort or preemption: the sequence's slot and its snapshots not yet published."""
        if seq.state_slot >= 0:
            self._free_running.append(seq.state_slot)
            seq.state_slot = -1
        self._free_snapshots.extend(seq.pending_snapshots.values())
        seq.pending_snapshots = {}
        seq.state_init = None

    def wants_snapshot(self, block_index: int) -> bool:
        return self.interval > 0 and (block_index + 1) % self.interval == 0

    def take_snapshot_slot(self) -> int | None:
        """A slot for a new snapshot: a free one, else the least recently used cached one's."""
        if self._free_snapshots:
            return self._free_snapshots.pop()
        if self._snapshot_of:
            self.snapshots_evicted += 1
            return self._snapshot_of.popitem(last=False)[1]
        return None

    def publish(self, block_hash: int, slot: int) -> None:
        """The snapshot in `slot` is the state at the end of the block with this hash."""
        if block_hash in self._snapshot_of:  # another sequence got there first: keep one copy
            self._free_snapshots.append(slot)
            self._snapshot_of.move_to_end(block_hash)
            return
        self._snapshot_of[block_hash] = slot
        self.snapshots_taken += 1

    def lookup(self, block_hash: int) -> int | None:
        slot = self._snapshot_of.get(block_hash)
        if slot is not None:
            self._snapshot_of.move_to_end(block_hash)
        return slot

    def forget(self, block_hash: int) -> None:
        """The block with this hash left the KV pool: its snapshot can no longer be used."""
        slot = self._snapshot_of.pop(block_hash, None)
        if slot is not None:
            self._free_snapshots.append(slot)
