"""The Redis prefix-cache tier (redis-py): pipelined multi-get and set, bounded timeouts, and faults
that turn into misses, never into errors for a caller.

Keys: `mesh:kv:<block hash as 16 hex digits>`. The block hash already folds in the namespace (model
fingerprint, dtype, block size, tenant salt), so tenants and models can neither hit nor time each
other's entries. Each namespace has a byte budget per TTL window (a counter key); eviction under
memory pressure is Redis' own `maxmemory-policy allkeys-lru` (infra/redis/redis.conf sets it).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlparse

import redis

from mesh.cache.tier import TierStats

log = logging.getLogger("mesh.cache.redis")
KEY_PREFIX = "mesh:kv:"


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@")
    return url


class RedisTier:
    def __init__(self, url: str, namespace: str = "", ttl_s: int = 24 * 3600,
                 budget_bytes: int | None = None, timeout_s: float = 0.25, retry_after_s: float = 1.0,
                 warn_every_s: float = 30.0):
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis {url!r}: expected redis://HOST:PORT/DB, rediss://... or unix://PATH")
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           health_check_interval=0)
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.namespace = namespace
        self.budget_key = f"mesh:budget:{namespace}"
        self.retry_after_s = retry_after_s
        self.warn_every_s = warn_every_s
        self.stats = TierStats("redis")
        self._down_until = 0.0
        self._last_warning = -float("inf")

    # ---- fault handling ---------------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, err: Exception) -> None:
        # Back off for a moment (so a dead Redis costs one timeout per interval, not one per call),
        # then try again: a Redis that comes back is picked up without a restart.
        self.stats.errors += 1
        self._down_until = time.monotonic() + self.retry_after_s
        now = time.monotonic()
        if now - self._last_warning >= self.warn_every_s:
            self._last_warning = now
            log.warning("redis prefix cache %s failed (%s: %s); serving without it, retrying every %.0fs",
                        what, type(err).__name__, err, self.retry_after_s)

    # ---- the tier ---------------------------------------------------------------------------
    def get_many(self, keys: list[int]) -> list[bytes | None]:
        self.stats.lookups += len(keys)
        if not keys or not self._available():
            return [None] * len(keys)
        t0 = time.perf_counter()
        try:
            values = self.client.mget([f"{KEY_PREFIX}{k:016x}" for k in keys])
        except (redis.RedisError, OSError) as e:
            self._failed("read", e)
            return [None] * len(keys)
        self.stats.read_seconds = (self.stats.read_seconds + [time.perf_counter() - t0])[-256:]
        hits = [v for v in values if v is not None]
        self.stats.hits += len(hits)
        self.stats.bytes_read += sum(map(len, hits))
        return values

    def put_many(self, items: list[tuple[int, bytes]]) -> None:
        if not items:
            return
        if not self._available():
            self.stats.dropped_writes += len(items)
            return
        size = sum(len(v) for _, v in items)
        try:
            if self.budget_bytes is not None:
                used = int(self.client.get(self.budget_key) or 0)
                if used + size > self.budget_bytes:
                    self.stats.dropped_writes += len(items)
                    return
            pipe = self.client.pipeline(transaction=False)
            for k, v in items:
                pipe.set(f"{KEY_PREFIX}{k:016x}", v, ex=self.ttl_s)
            if self.budget_bytes is not None:
                pipe.incrby(self.budget_key, size)
                pipe.expire(self.budget_key, self.ttl_s, nx=True)
            pipe.execute()
        except (redis.RedisError, OSError) as e:
            self.stats.dropped_writes += len(items)
            self._failed("write", e)
            return
        self.stats.bytes_written += size
        self.stats.blocks_written += len(items)

    def delete(self, key: int) -> None:
        if not self._available():
            return
        try:
            self.client.delete(f"{KEY_PREFIX}{key:016x}")
        except (redis.RedisError, OSError) as e:
            self._failed("delete", e)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
