"""Engine.stats(): the one typed snapshot the gateway, the metrics and the admin surface read, counted
from what the engine really did (steps, preemptions, routed rows, KV blocks)."""

import dataclasses

import torch

from conftest import DEVICE
from mesh.config import EngineConfig, ModelConfig
from mesh.engine.engine import Engine
from mesh.engine.stats import EngineStats, PoolStats
from mesh.model.attention import KVCache
from mesh.types import SamplingParams


def test_stats_count_steps_preemptions_and_routed_rows(hf_checkpoints):
    path = hf_checkpoints["qwen3_moe"]
    mc = ModelConfig.from_dir(path)
    per_block = KVCache.bytes_per_block(mc.num_kv_layers, 16, mc.num_kv_heads, mc.head_dim, torch.float32)
    engine = Engine(path, EngineConfig(dtype="float32", device=DEVICE, kv_cache_memory=6 * per_block,
                                       max_num_seqs=8, max_num_batched_tokens=32))
    idle = engine.stats()  # nothing run yet
    assert (idle.kv_blocks_free, idle.max_num_seqs, idle.max_num_batched_tokens) == (6, 8, 32)
    assert (idle.steps, idle.running, idle.waiting, idle.preemptions, idle.kv_blocks_used) == (0, 0, 0, 0, 0)
    assert idle.pool.num_workers == 0 and idle.pool.worker_compute_seconds == ()  # experts in-process
    assert idle.pool.expert_load is None and engine.stats(expert_load=True).pool.expert_load.sum() == 0

    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[t % 100 + 1 for t in range(i, i + 20)] for i in range(4)]  # 4 x 44 tokens in 6 x 16 slots
    for p in prompts:
        engine.add_request(engine.make_request(prompt_token_ids=p, sampling=sampling))
    engine.step()
    mid = engine.stats()
    assert mid.steps == 1 and mid.running + mid.waiting == 4
    assert mid.kv_blocks_used + mid.kv_blocks_free == 6 and mid.kv_blocks_used > 0
    while engine.has_unfinished():
        engine.step()
    st = engine.stats(expert_load=True)
    assert st.steps == engine.num_steps > mid.steps
    assert st.preemptions == engine.scheduler.num_preemptions > 0  # the pool is too small for all four
    assert (st.running, st.waiting, st.kv_blocks_used, st.kv_blocks_free) == (0, 0, 0, 6)
    load = st.pool.expert_load
    assert (st.pool.moe_layers, st.pool.num_experts) == (load.shape[0], mc.num_experts) and load.shape[0] == mc.num_moe_layers
    # every computed token (recomputed ones after a preemption too) is routed to top_k experts per layer
    assert (load.sum(dim=1) == load[0].sum()).all() and load[0].sum() % mc.top_k == 0
    assert load[0].sum() >= mc.top_k * sum(len(p) + sampling.max_tokens - 1 for p in prompts)
    assert st.pool.expert_seconds > 0 and st.pool.expert_cpu_seconds > 0
    # a copy: the engine's own counters move on without changing a snapshot taken before
    before = load.clone()
    engine.generate([engine.make_request(prompt_token_ids=[1, 2, 3], sampling=sampling)])
    assert torch.equal(load, before) and engine.stats(expert_load=True).pool.expert_load.sum() > before.sum()


def test_stats_are_frozen_and_extend_with_defaults():
    st = EngineStats()
    assert st.pool == PoolStats() and st.pool.moe_layers == 0 and st.pool.num_experts == 0
    try:
        st.steps = 3
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("EngineStats must be immutable: readers on other threads share it")


def test_latency_window_percentiles_over_the_last_seconds(monkeypatch):
    from mesh.engine import observe
    clock = [100.0]
    monkeypatch.setattr(observe.time, "monotonic", lambda: clock[0])
    w = observe.LatencyWindow(size=8)
    assert w.percentile("ttft", 90, 10.0) == (0.0, 0)
    for i in range(10):  # 10 samples, one a second; the window keeps the newest 8
        w.add("ttft", float(i))
        clock[0] += 1.0
    assert w.percentile("ttft", 50, 100.0) == (6.0, 8)  # 2..9: nearest rank of the median
    assert w.percentile("ttft", 90, 100.0) == (8.0, 8)
    assert w.percentile("ttft", 90, 3.0) == (9.0, 3)  # 7, 8, 9: taken in the last 3 s
    assert w.percentile("tpot", 90, 100.0) == (0.0, 0)
