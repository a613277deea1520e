"""Time to first token for a 2,048-token prompt on the `bench` preset: cold, warm from the local block
pool, and warm from Redis after a gateway restart (a fresh engine with an empty pool), in one run.
Also: bytes stored in Redis per prompt token, and Redis round trips per request; and a short shared
prefix (--shared-prefix tokens, default 100) between two otherwise different prompts: the tokens the
second one is served from cache.

Starts its own redis-server on a free loopback port.

    .venv/bin/python bench/prefix_cache.py [--arch qwen3_next] [--dtype bfloat16] [--prompt-tokens 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time

from common import bench_model, emit, hardware

from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.redis_tier import RedisTier


def start_redis() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    tier = RedisTier(url)
    deadline = time.monotonic() + 10
    while not tier.ping():
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("redis-server did not start")
        time.sleep(0.05)
    return proc, url


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from add_request to the first token, and the cached tokens it reported."""
    req = engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=1, temperature=0))
    t = time.perf_counter()
    engine.add_request(req)
    while True:
        outs = engine.step()
        if outs:
            return time.perf_counter() - t, outs[0].usage.cached_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", default="qwen3_moe", help="the bench preset's family: qwen3_moe (default) or "
                    "qwen3_next (the hybrid: its state is restored from snapshots at block boundaries)")
    ap.add_argument("--shared-prefix", type=int, default=100, help="tokens two prompts share (default 100)")
    args = ap.parse_args()
    model_dir = bench_model(args.arch)
    emit({"bench": "prefix_cache", "hardware": hardware(), "model": str(model_dir), "dtype": args.dtype,
          "arch": args.arch})
    proc, url = start_redis()
    try:
        cfg = EngineConfig(dtype=args.dtype, kv_cache_memory=1 << 30, max_num_batched_tokens=args.prompt_tokens)
        rng = random.Random(0)
        warm_engine = Engine(model_dir, cfg)
        ttft(warm_engine, [rng.randrange(1000) for _ in range(64)])  # allocator and kernels warm
        cold, local, remote, round_trips, stored_per_token = [], [], [], [], []
        for _ in range(args.repeat):
            prompt = [rng.randrange(warm_engine.model_config.vocab_size) for _ in range(args.prompt_tokens)]
            # gateway 1: cold, then warm from its own pool
            tier = RedisTier(url)
            g1 = Engine(model_dir, cfg, prefix_tier=tier)
            t_cold, c0 = ttft(g1, prompt)
            g1.prefix_cache.flush(30)  # background writes done: they would share the CPU with what follows
            t_local, c1 = ttft(g1, prompt)
            stored_per_token.append(tier.stats.bytes_written / args.prompt_tokens)
            g1.close()
            # gateway 2: a restart: empty pool, same Redis
            tier2 = RedisTier(url)
            g2 = Engine(model_dir, cfg, prefix_tier=tier2)
            t_remote, c2 = ttft(g2, prompt)
            round_trips.append(len(tier2.stats.read_seconds))
            g2.close()
            assert c0 == 0 and c1 > 0 and c2 > 0, (c0, c1, c2)
            cold.append(t_cold)
            local.append(t_local)
            remote.append(t_remote)
            emit({"prompt_tokens": args.prompt_tokens, "ttft_cold_ms": t_cold * 1e3,
                  "ttft_local_ms": t_local * 1e3, "ttft_redis_ms": t_remote * 1e3,
                  "cached_tokens_local": c1, "cached_tokens_redis": c2})
        # a short shared prefix: two prompts agreeing on their first --shared-prefix tokens only
        g3 = Engine(model_dir, cfg)
        shared = [rng.randrange(g3.model_config.vocab_size) for _ in range(args.shared_prefix)]
        ttft(g3, shared + [rng.randrange(1000) for _ in range(40)])
        _, hit = ttft(g3, shared + [rng.randrange(1000) for _ in range(30)])
        emit({"shared_prefix_tokens": args.shared_prefix, "cached_tokens": hit, "block_size": cfg.block_size})
        med = statistics.median
        emit({"summary": True, "ttft_cold_ms": med(cold) * 1e3, "ttft_local_ms": med(local) * 1e3,
              "ttft_redis_ms": med(remote) * 1e3, "speedup_local": med(cold) / med(local),
              "speedup_redis": med(cold) / med(remote), "redis_bytes_per_token": med(stored_per_token),
              "redis_round_trips_per_request": med(round_trips)})
    finally:
        proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
