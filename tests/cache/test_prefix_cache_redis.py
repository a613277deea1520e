"""The Redis prefix-cache tier with a real redis-server: identical tokens with and without it, sharing
across processes and restarts, tenant isolation, Redis dying and coming back, corrupt entries,
eviction under a small maxmemory."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES, ROOT, RedisServer
from mesh.cache.codec import decode_block, encode_block
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.redis_tier import KEY_PREFIX, RedisTier

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = list(range(3, 90))  # 87 tokens: 5 full blocks of 16 are cacheable


def _engine(model_dir, url=None, **kw):
    tier = RedisTier(url) if url else None
    return Engine(model_dir, EngineConfig(dtype="float32", **kw), prefix_tier=tier)


def _run(engine, prompt=PROMPT, salt="", use_cache=True):
    req = engine.make_request(prompt_token_ids=prompt, sampling=GREEDY, cache_salt=salt,
                              use_prefix_cache=use_cache)
    out = engine.generate([req])[0]
    if engine.prefix_cache is not None:
        assert engine.prefix_cache.flush()
    return out


def test_codec_round_trip_and_rejects_damage():
    kv = torch.randn(3, 2, 16, 2, 8).to(torch.bfloat16)
    payload = encode_block(kv)
    assert torch.equal(decode_block(payload, torch.bfloat16, tuple(kv.shape)), kv)
    assert decode_block(payload[:-1], torch.bfloat16, tuple(kv.shape)) is None  # truncated
    flipped = bytearray(payload)
    flipped[100] ^= 1
    assert decode_block(bytes(flipped), torch.bfloat16, tuple(kv.shape)) is None  # corrupt
    assert decode_block(payload, torch.float32, tuple(kv.shape)) is None  # wrong dtype
    assert decode_block(payload, torch.bfloat16, (3, 2, 16, 2, 4)) is None  # wrong shape


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_tokens_with_and_without_redis(family, hf_checkpoints, redis_server):
    d = hf_checkpoints[family]
    plain = _run(_engine(d, enable_prefix_caching=False))
    first = _engine(d, redis_server.url)
    a = _run(first)
    assert a.usage.cached_tokens == 0 and first.prefix_cache.tier.stats.blocks_written >= 5
    second = _engine(d, redis_server.url)  # a new gateway: its local pool is empty
    b = _run(second)
    assert b.usage.cached_tokens == 80  # five blocks from Redis
    # a hybrid model's blocks come with their recurrent-state snapshots (another key each)
    assert second.prefix_cache.tier.stats.hits == (10 if family == "qwen3_next" else 5)
    assert plain.token_ids == a.token_ids == b.token_ids


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.redis_tier import RedisTier
e = Engine({model!r}, EngineConfig(dtype="float32"), prefix_tier=RedisTier({url!r}))
r = e.generate([e.make_request(prompt_token_ids={prompt!r},
                               sampling=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))])[0]
e.close()
print(json.dumps({{"tokens": r.token_ids, "cached": r.usage.cached_tokens}}))
"""


def _child(model_dir, url):
    code = CHILD.format(root=str(ROOT), model=str(model_dir), url=url, prompt=PROMPT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_another_process_and_a_restart_get_cached_tokens(hf_checkpoints, redis_server):
    d = hf_checkpoints["qwen3_moe"]
    producer = _child(d, redis_server.url)  # gateway process 1 computes and stores
    assert producer["cached"] == 0
    here = _run(_engine(d, redis_server.url))  # gateway 2 (this process) reads
    assert here.usage.cached_tokens == 80 and here.token_ids == producer["tokens"]
    restarted = _child(d, redis_server.url)  # a fresh process after "restart"
    assert restarted == {"tokens": producer["tokens"], "cached": 80}


def test_tenants_are_isolated_and_opt_out_works(hf_checkpoints, redis_server):
    d = hf_checkpoints["qwen2_moe"]
    _run(_engine(d, redis_server.url), salt="tenant-a")
    other = _run(_engine(d, redis_server.url), salt="tenant-b")
    assert other.usage.cached_tokens == 0
    same = _engine(d, redis_server.url)
    assert _run(same, salt="tenant-a").usage.cached_tokens == 80
    opted_out = _engine(d, redis_server.url)
    assert _run(opted_out, salt="tenant-a", use_cache=False).usage.cached_tokens == 0
    assert opted_out.prefix_cache.tier.stats.lookups == 0


def test_redis_down_then_back(hf_checkpoints, caplog):
    d = hf_checkpoints["mixtral"]
    server = RedisServer()
    try:
        engine = _engine(d, server.url)
        engine.prefix_cache.tier.retry_after_s = 0.2
        want = _run(engine).token_ids
        port = server.port
        server.stop()
        with caplog.at_level(logging.WARNING, logger="mesh.cache.redis"):
            for i in range(3):  # requests keep being served, correctly
                # retry_after_s=0: the tier tries Redis again on every call (no waiting out its back-off)
                fresh = Engine(d, EngineConfig(dtype="float32"),
                               prefix_tier=RedisTier(f"redis://127.0.0.1:{port}/0", retry_after_s=0.0))
                assert _run(fresh).token_ids == want
        assert sum("redis prefix cache" in r.message for r in caplog.records) >= 1
        assert fresh.prefix_cache.tier.stats.errors >= 1
        assert server.start(), f"redis-server could not restart on port {port} (taken meanwhile?)"
        other = [(7 * i + 1) % 128 for i in range(87)]
        _run(fresh, prompt=other)  # writes again: the tier came back without a restart
        assert fresh.prefix_cache.tier.stats.blocks_written >= 5
        assert _run(_engine(d, server.url), prompt=other).usage.cached_tokens == 80
    finally:
        server.stop()


def test_corrupt_entry_is_a_miss_and_is_deleted(hf_checkpoints, redis_server):
    d = hf_checkpoints["qwen3_moe"]
    want = _run(_engine(d, redis_server.url)).token_ids
    keys = sorted(redis_server.client.keys(KEY_PREFIX + "*"))
    assert len(keys) >= 5
    for k in keys:  # damage every entry: truncate half, flip a byte in the others
        v = redis_server.client.get(k)
        redis_server.client.set(k, v[: len(v) // 2] if hash(k) % 2 else v[:50] + bytes([v[50] ^ 0xFF]) + v[51:])
    damaged = {k: redis_server.client.get(k) for k in keys}
    # a tier whose writes are all refused (a byte budget of 0), so nothing rewrites what a read deleted
    engine = Engine(d, EngineConfig(dtype="float32"), prefix_tier=RedisTier(redis_server.url, budget_bytes=0))
    out = _run(engine)
    assert out.token_ids == want and out.usage.cached_tokens == 0
    assert engine.prefix_cache.tier.stats.corrupt == 1  # the first block failed: the chain stops there
    assert engine.prefix_cache.tier.stats.blocks_written == 0
    left = set(redis_server.client.keys(KEY_PREFIX + "*"))
    gone = set(keys) - left
    assert len(gone) == 1, f"the corrupt entry read was not deleted (or more were): {len(gone)} gone"
    assert all(not redis_server.client.exists(k) for k in gone)
    assert all(redis_server.client.get(k) == damaged[k] for k in left)  # the chain's unread rest untouched
    # a run that may write puts good entries back: the next engine is served from Redis
    _run(_engine(d, redis_server.url))
    assert _run(_engine(d, redis_server.url)).usage.cached_tokens == 80


def test_eviction_under_small_maxmemory(hf_checkpoints):
    server = RedisServer(maxmemory="2mb")
    try:
        d = hf_checkpoints["qwen3_moe"]
        engine = _engine(d, server.url)
        g = torch.Generator().manual_seed(0)
        outs = []
        base = server.client.info("memory")["used_memory"]
        for _ in range(40):  # 40 distinct prompts x 5 blocks x 12 KiB: more than maxmemory holds
            p = torch.randint(0, 128, (87,), generator=g).tolist()
            outs.append((p, _run(engine, prompt=p).token_ids))
        info = server.client.info("memory")
        assert base < 2 * 2**20 and info["used_memory"] <= 2 * 2**20 * 1.1
        assert server.client.info("stats")["evicted_keys"] > 0
        # what is left still serves correct tokens
        fresh = _engine(d, server.url, enable_prefix_caching=True)
        for p, want in outs[-3:]:
            assert _run(fresh, prompt=p).token_ids == want
    finally:
        server.stop()


def test_slow_redis_is_a_bounded_miss(hf_checkpoints, redis_server):
    """A Redis that hangs (the process stopped) is a miss after the tier's timeout: the request is
    computed and finishes while Redis is still stopped (it does not wait for Redis to come back)."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor
    d = hf_checkpoints["qwen3_moe"]
    want = _run(_engine(d, enable_prefix_caching=False)).token_ids
    engine = Engine(d, EngineConfig(dtype="float32"), prefix_tier=RedisTier(redis_server.url, timeout_s=0.2))
    assert engine.prefix_cache.tier.ping()  # connected while healthy
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(engine.generate, [engine.make_request(prompt_token_ids=PROMPT, sampling=GREEDY)])
            out = job.result(timeout=120)[0]  # generous: only a hang (no timeout at all) fails here
        assert redis_server.proc.poll() is None  # still stopped, not dead: the answer did not need it
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert out.token_ids == want and out.usage.cached_tokens == 0
    assert engine.prefix_cache.tier.stats.errors >= 1


def test_tenant_metadata_over_grpc_isolates_the_cache(tiny_dir, redis_server):
    """x-tenant-id in gRPC metadata salts the hashes: same tenant hits, another tenant does not, in
    the local tier and in Redis (a second gateway with an empty local tier)."""
    import time

    import grpc as grpc_
    from router_service.protos import inference_pb2 as pb
    from router_service.protos import inference_pb2_grpc as pb_grpc
    from conftest import LiveGateway
    gw = LiveGateway(lambda: Engine(tiny_dir, EngineConfig(dtype="float32", kv_cache_memory=4 << 20),
                                    prefix_tier=RedisTier(redis_server.url)))
    try:
        with grpc_.insecure_channel(gw.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            req = pb.GenerateRequest(prompt_token_ids=list(range(1, 70)),
                                     sampling=pb.SamplingParams(max_tokens=2, temperature=0))

            def cached(tenant, **kw):
                r = pb.GenerateRequest()
                r.CopyFrom(req)
                for k, v in kw.items():
                    setattr(r, k, v)
                return stub.Complete(r, metadata=[("x-tenant-id", tenant)]).usage.cached_tokens
            assert cached("acme") == 0
            assert cached("acme") == 64  # four full blocks, local tier
            assert cached("globex") == 0  # another tenant: another namespace
            assert cached("acme", disable_prefix_cache=True) == 0  # a request may opt out
    finally:
        gw.close()
    # both tenants' four blocks reach Redis under different keys (written off the hot path: wait)
    deadline = time.monotonic() + 60
    while len(redis_server.client.keys(KEY_PREFIX + "*")) < 8:
        assert time.monotonic() < deadline, redis_server.client.keys(KEY_PREFIX + "*")
        time.sleep(0.05)
    assert len(redis_server.client.keys(KEY_PREFIX + "*")) == 8
    # a fresh gateway (empty local tier) on the same Redis: the tenant's blocks come from Redis,
    # and a tenant that never ran gets none of them
    gw = LiveGateway(lambda: Engine(tiny_dir, EngineConfig(dtype="float32", kv_cache_memory=4 << 20),
                                    prefix_tier=RedisTier(redis_server.url)))
    try:
        with grpc_.insecure_channel(gw.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            assert cached("initech") == 0
            assert gw.gw.engine.prefix_cache.tier.stats.hits == 0
            assert cached("acme") == 64
            assert gw.gw.engine.prefix_cache.tier.stats.hits == 4  # from Redis, not the local tier
    finally:
        gw.close()
