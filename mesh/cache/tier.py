"""Prefix-cache tiers beyond the local block pool, behind one small interface.

A tier maps a block's chained hash (which already folds in the namespace: model fingerprint, dtype,
block size, tenant salt) to an opaque payload: the block's KV today, a recurrent-state snapshot at a
block boundary for hybrid models later. Tiers never raise into the engine: a tier that is down,
slow or returns garbage behaves as a miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class TierStats:
    name: str
    lookups: int = 0  # blocks asked for
    hits: int = 0  # blocks returned intact
    corrupt: int = 0  # payloads that failed their checksum (deleted)
    errors: int = 0  # calls that failed or timed out
    bytes_read: int = 0
    bytes_written: int = 0
    blocks_written: int = 0
    dropped_writes: int = 0  # writes skipped: queue full, over budget, or tier down
    read_seconds: list[float] = field(default_factory=list)  # recent call latencies

    def as_dict(self) -> dict:
        lat = sorted(self.read_seconds)
        p50 = lat[len(lat) // 2] * 1e3 if lat else 0.0
        return {"tier": self.name, "lookups": self.lookups, "hits": self.hits,
                "hit_rate": self.hits / self.lookups if self.lookups else 0.0, "corrupt": self.corrupt,
                "errors": self.errors, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "blocks_written": self.blocks_written, "dropped_writes": self.dropped_writes,
                "read_ms_p50": p50}


class PrefixTier(Protocol):
    stats: TierStats

    def get_many(self, keys: list[int]) -> list[bytes | None]:
        """Payloads for `keys`, None for a miss. Bounded in time; never raises."""

    def put_many(self, items: list[tuple[int, bytes]]) -> None:
        """Queue payloads for writing and return at once (writes happen off the step's path)."""

    def delete(self, key: int) -> None:
        """Drop a payload found to be corrupt."""

    def close(self) -> None:
        """Flush what can be flushed quickly and stop background work."""
