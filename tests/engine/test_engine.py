"""The single-process engine against transformers: greedy tokens alone and under continuous batching,
chunked prefill, forced preemption, prefix sharing, seeded sampling, and input validation."""

import pytest
import torch

from conftest import DEVICE, FAMILIES, hf_greedy, native_env
from mesh.config import ConfigError, EngineConfig, ModelConfig
from mesh.engine.engine import Engine
from mesh.model.attention import KVCache
from mesh.model.dispatch import ExpertsLost
from mesh.types import FinishReason, InvalidRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _prompts(n, seed=0, lo=1, hi=70, vocab=128):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def _engine(path, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", DEVICE)
    return Engine(path, EngineConfig(**kw))


def _memory_for_blocks(mc: ModelConfig, blocks: int, max_num_seqs: int = 16) -> int:
    """--kv-cache-memory that leaves `blocks` KV blocks of 16 tokens (float32). A hybrid model's budget
    also holds a recurrent state per running sequence (at most half of it) and, with prefix caching,
    snapshots taking half of what is left after those."""
    per_block = KVCache.bytes_per_block(mc.num_kv_layers, 16, mc.num_kv_heads, mc.head_dim, torch.float32)
    if not mc.num_linear_layers:
        return blocks * per_block
    running = (max_num_seqs + 1) * mc.state_bytes_per_sequence
    return max(2 * running, running + 2 * blocks * per_block + mc.state_bytes_per_sequence)


@pytest.fixture(scope="module")
def references(hf_models):
    prompts = _prompts(16)
    return prompts, {f: [hf_greedy(hf_models[f], p, GREEDY.max_tokens) for p in prompts] for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_alone_matches_transformers(family, hf_checkpoints, references):
    prompts, refs = references
    engine = _engine(hf_checkpoints[family])
    for p, ref in list(zip(prompts, refs[family]))[:4]:
        out = engine.generate([engine.make_request(prompt_token_ids=p, sampling=GREEDY)])[0]
        assert out.token_ids == ref
        assert out.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["batched", "chunked", "preempted", "micro-batched", "torch-ops"])
def test_greedy_batch_of_16_matches_transformers(family, mode, hf_checkpoints, references, monkeypatch):
    prompts, refs = references
    cfg = {"batched": {}, "chunked": {"max_num_batched_tokens": 16},
           "preempted": {"max_num_batched_tokens": 32},
           "micro-batched": {"max_num_batched_tokens": 64, "micro_batches": 2},
           "torch-ops": {"max_num_batched_tokens": 48}}[mode]
    if mode == "torch-ops":  # the torch ops every native kernel falls back to (and the GPU path)
        native_env(monkeypatch, "MESH_NATIVE_KERNELS", "0")
    if mode == "preempted":
        # a pool of 10 blocks x 16 tokens: far less than 16 prompts need at once
        cfg["kv_cache_memory"] = _memory_for_blocks(ModelConfig.from_dir(hf_checkpoints[family]), 10)
        cfg["max_num_seqs"] = 16
    engine = _engine(hf_checkpoints[family], **cfg)
    outs = engine.generate([engine.make_request(prompt_token_ids=p, sampling=GREEDY) for p in prompts])
    assert [o.token_ids for o in outs] == refs[family]
    if mode == "preempted":
        assert engine.scheduler.num_preemptions > 0
    if mode == "chunked":
        assert engine.num_steps > len(prompts) + GREEDY.max_tokens  # prompts really were split
    assert engine.blocks.num_used == 0  # every block came back


class LosingDispatcher:
    """The real in-process dispatcher with a lost expert pool injected: in each step listed, the
    second MoE layer's dispatch raises ExpertsLost (what the collective dispatcher raises when a
    worker dies mid-step), after the first layer's attention wrote KV and, in a hybrid model, advanced
    recurrent states."""

    def __init__(self, inner, steps):
        self._inner, self.steps, self.fired, self._step = inner, set(steps), 0, -1

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def begin_step(self, num_tokens, micro_batches=1):
        self._step += 1
        self._inner.begin_step(num_tokens, micro_batches)

    def dispatch(self, moe_index, hidden, topk_ids, topk_weights):
        if self._step in self.steps and moe_index == 1:
            self.steps.discard(self._step)
            self.fired += 1
            raise ExpertsLost("injected: expert worker 1 died")
        return self._inner.dispatch(moe_index, hidden, topk_ids, topk_weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_lost_mid_forward_are_recomputed_to_the_same_tokens(family, hf_checkpoints, references):
    """A step that loses its experts half-way (prefill, mixed and decode steps) is void: its sequences
    go back to the queue with their tokens and come out with exactly transformers' greedy tokens, every
    KV block and state slot returned."""
    prompts, refs = references
    engine = _engine(hf_checkpoints[family], max_num_batched_tokens=64)
    engine.dispatcher = engine.runner.dispatcher = LosingDispatcher(engine.dispatcher, steps={0, 3, 9, 20})
    outs = engine.generate([engine.make_request(prompt_token_ids=p, sampling=GREEDY) for p in prompts])
    assert engine.dispatcher.fired == 4 and engine.num_lost_steps == 4
    assert [o.token_ids for o in outs] == refs[family]
    assert engine.blocks.num_used == 0


def test_shared_prefixes_share_blocks_and_give_identical_outputs(hf_checkpoints):
    engine = _engine(hf_checkpoints["qwen3_moe"])
    prefix = list(range(1, 65))  # four full blocks
    a = engine.make_request(prompt_token_ids=prefix + [7, 8, 9], sampling=GREEDY)
    b = engine.make_request(prompt_token_ids=prefix + [10, 11], sampling=GREEDY)
    engine.add_request(a)
    engine.step()  # a's prompt is computed, its full blocks hashed
    engine.add_request(b)
    engine.step()
    sa, sb = engine._seqs[a.request_id], engine._seqs[b.request_id]
    assert sa.block_ids[:4] == sb.block_ids[:4]  # the same physical blocks
    assert all(engine.blocks.ref_count[x] == 2 for x in sa.block_ids[:4])
    assert sb.num_cached_tokens == 64
    while engine.has_unfinished():
        engine.step()
    cold = _engine(hf_checkpoints["qwen3_moe"], enable_prefix_caching=False)
    ref = cold.generate([cold.make_request(prompt_token_ids=prefix + [10, 11], sampling=GREEDY)])[0]
    warm = engine.generate([engine.make_request(prompt_token_ids=prefix + [10, 11], sampling=GREEDY)])[0]
    assert warm.token_ids == ref.token_ids
    assert warm.usage.cached_tokens == 64 and ref.usage.cached_tokens == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(hf_checkpoints):
    engine = _engine(hf_checkpoints["mixtral"])
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    alone = engine.generate([engine.make_request(prompt_token_ids=[1, 2, 3], sampling=sp)])[0].token_ids
    others = [engine.make_request(prompt_token_ids=p, sampling=SamplingParams(max_tokens=12, temperature=1.0))
              for p in _prompts(5, seed=9)]
    batch = engine.generate(others + [engine.make_request(prompt_token_ids=[1, 2, 3], sampling=sp)])
    assert batch[-1].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=99, ignore_eos=True)
    diff = engine.generate([engine.make_request(prompt_token_ids=[1, 2, 3], sampling=other_seed)])[0]
    assert diff.token_ids != alone


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_a_resumed_request_continues_as_the_lost_stream_would_have(kind, tiny_dir):
    """A stream cut after k tokens and resumed from them (resume_token_ids) produces exactly the rest of
    the uninterrupted one, text included, and counts only its own tokens in usage."""
    engine = _engine(tiny_dir)
    sp = dict(max_tokens=16, ignore_eos=True)
    sp.update(temperature=0) if kind == "greedy" else sp.update(temperature=1.0, top_p=0.9, seed=7)
    prompt = "def fibonacci(n):"
    whole = engine.generate([engine.make_request(prompt=prompt, sampling=SamplingParams(**sp))])[0]
    for k in (1, 6, 15):
        req = engine.make_request(prompt=prompt, sampling=SamplingParams(**sp), resume_token_ids=whole.token_ids[:k])
        rest = engine.generate([req])[0]
        assert rest.token_ids == whole.token_ids[k:], k
        assert engine.tokenizer.decode(whole.token_ids[:k]) + rest.text == whole.text
        assert rest.usage.completion_tokens == 16 - k and rest.finish_reason is FinishReason.LENGTH
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("kw,message", [
    ({"resume_token_ids": [1] * 16}, "already reach max_tokens"),
    ({"resume_token_ids": [10 ** 6]}, "resume_token_ids: token id 1000000 is outside the vocabulary"),
    ({"resume_token_ids": [1], "n": 2}, "resume one completion; n is 2"),
])
def test_bad_resumes_are_rejected_clearly(kw, message, tiny_dir):
    engine = _engine(tiny_dir)
    n = kw.pop("n", 1)
    req = engine.make_request(prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=16, n=n), **kw)
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(req)


def test_stop_token_ids_and_max_tokens(hf_checkpoints, references):
    prompts, refs = references
    engine = _engine(hf_checkpoints["qwen2_moe"])
    ref = refs["qwen2_moe"][0]
    stop_at = ref[3]
    sp = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,))
    out = engine.generate([engine.make_request(prompt_token_ids=prompts[0], sampling=sp)])[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == ref[:ref.index(stop_at) + 1]


def test_abort_frees_blocks(hf_checkpoints):
    engine = _engine(hf_checkpoints["qwen3_moe"])
    req = engine.make_request(prompt_token_ids=list(range(50)), sampling=GREEDY)
    engine.add_request(req)
    engine.step()
    assert engine.blocks.num_used == 4
    assert engine.abort(req.request_id)
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()


def test_memory_does_not_grow_with_requests_served(hf_checkpoints):
    """Waves of requests (shared prefixes, sampling, stops, aborts) through one engine: after the
    first wave, neither Python allocations nor live tensors grow; only the KV pool holds state."""
    import gc
    import tracemalloc

    engine = _engine(hf_checkpoints["qwen3_moe"], kv_cache_memory=1 << 20)
    shared = list(range(3, 35))  # two full blocks every request of a wave shares

    def wave(seed):
        reqs = []
        for i, p in enumerate(_prompts(24, seed=seed, hi=40)):
            sp = SamplingParams(max_tokens=4 + i % 5, temperature=0 if i % 2 else 0.8, seed=i,
                                stop_token_ids=(7,) if i % 3 == 0 else ())
            reqs.append(engine.make_request(prompt_token_ids=shared + p, sampling=sp))
        for r in reqs:
            engine.add_request(r)
        engine.step()
        engine.abort(reqs[0].request_id)  # one aborted mid-flight per wave
        while engine.has_unfinished():
            engine.step()

    def live_tensors():
        import warnings
        with warnings.catch_warnings():  # isinstance on some torch module objects warns of deprecations
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    tracemalloc.start()
    try:
        wave(0)
        gc.collect()
        # Count tensors before the baseline: looking at every object once resolves lazy module proxies
        # (the openai package's, when an earlier test imported it), importing tens of MB of modules.
        tensors0 = live_tensors()
        mem0 = tracemalloc.get_traced_memory()[0]
        for seed in range(1, 5):
            wave(seed)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - mem0
    finally:
        tracemalloc.stop()
    assert live_tensors() == tensors0
    assert grown < 64 << 10, f"Python allocations grew by {grown} bytes over 4 waves of 24 requests"
    assert engine.num_running == engine.num_waiting == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_token_ids=[]), "prompt is empty"),
    (dict(prompt_token_ids=[1, 128]), "token id 128 is outside the vocabulary"),
    (dict(prompt_token_ids=[-1]), "token id -1 is outside"),
    (dict(prompt_token_ids=list(range(100)) * 6), "prompt has 600 tokens.*at most 512"),
    (dict(prompt="hello"), "no tokenizer.json"),
])
def test_bad_requests_are_rejected_clearly(kwargs, message, hf_checkpoints):
    engine = _engine(hf_checkpoints["qwen3_moe"])
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(engine.make_request(**kwargs))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-3), "top_k must be"),
])
def test_bad_sampling_params_are_rejected_clearly(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_kv_budget_too_small_is_a_config_error(hf_checkpoints):
    with pytest.raises(ConfigError, match="kv-cache-memory"):
        _engine(hf_checkpoints["qwen3_moe"], kv_cache_memory=1000)


def test_stop_strings_end_the_text_where_they_first_appear(tiny_dir):
    """The streamed text (every step's new_text joined) stops right before the first occurrence of any
    stop string, wherever the token boundaries fall; text that could begin a stop string is held back,
    never lost: without a match the whole text comes out."""
    engine = _engine(tiny_dir)
    prompt = engine.tokenizer.encode("def main():\n    ")

    def run(stop, n=48):
        req = engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
            max_tokens=n, temperature=0, ignore_eos=True, stop=stop))
        engine.add_request(req)
        pieces, last = [], None
        while engine.has_unfinished():
            for out in engine.step():
                pieces.append(out.new_text)
                last = out
        return "".join(pieces), last

    full, out = run(())
    assert out.finish_reason is FinishReason.LENGTH and len(full) >= 24, full
    assert run(("\x00never\x00",))[0] == full  # held back while it might match, then released
    for a, b in ((3, 7), (10, 11), (15, 21)):
        stop = full[a:b]
        text, out = run((stop, full[b:b + 9] + "\x00"))  # a second, longer stop string that never matches
        assert out.finish_reason is FinishReason.STOP
        assert text == full[:full.index(stop)], (stop, text)


@pytest.mark.parametrize("interval,shared_len,cached", [(1, 100, 96), (2, 90, 64), (3, 100, 96)])
def test_hybrid_prefixes_restore_kv_and_state_from_snapshots(interval, shared_len, cached, hf_checkpoints):
    """Qwen3-Next keeps a recurrent state per sequence: a cached prefix is usable up to the last block
    whose state snapshot was taken (every `interval` blocks of 16 tokens). A second prompt sharing 100
    tokens with the first hits 96 of them (90 shared at interval 2: 64, the 4th block's end) and
    produces exactly the tokens of a run without any prefix cache; a prompt sharing only 10 tokens (no
    full block) computes everything."""
    d = hf_checkpoints["qwen3_next"]
    g = torch.Generator().manual_seed(9)
    shared = torch.randint(0, 128, (shared_len,), generator=g).tolist()
    first = shared + torch.randint(0, 128, (7,), generator=g).tolist()
    second = shared + torch.randint(0, 128, (5,), generator=g).tolist()
    third = shared[:10] + torch.randint(0, 128, (30,), generator=g).tolist()
    cold = _engine(d, enable_prefix_caching=False)
    want = [cold.generate([cold.make_request(prompt_token_ids=p, sampling=GREEDY)])[0].token_ids
            for p in (second, third)]
    engine = _engine(d, state_snapshot_interval=interval)
    engine.generate([engine.make_request(prompt_token_ids=first, sampling=GREEDY)])
    assert engine.state_cache.num_cached_snapshots >= 5 // interval
    out = engine.generate([engine.make_request(prompt_token_ids=p, sampling=GREEDY) for p in (second, third)])
    assert out[0].usage.cached_tokens == cached
    assert out[1].usage.cached_tokens == 0
    assert [o.token_ids for o in out] == want
    # every block and every running state slot came back
    assert engine.blocks.num_used == 0 and len(engine.state_cache._free_running) == engine.config.max_num_seqs


def test_hybrid_state_budget_is_checked_and_named(hf_checkpoints):
    with pytest.raises(ConfigError, match="--max-num-seqs"):
        _engine(hf_checkpoints["qwen3_next"], kv_cache_memory=200_000, max_num_seqs=256)


def test_hybrid_n_completions_start_from_the_prompts_state_snapshot(hf_checkpoints):
    """n > 1 on the hybrid model: the other completions share the first one's prompt blocks up to the
    last block with a state snapshot and start from that snapshot; greedy, every completion equals the
    single-completion run (a wrong state would change them)."""
    d = hf_checkpoints["qwen3_next"]
    prompt = torch.randint(0, 128, (53,), generator=torch.Generator().manual_seed(12)).tolist()
    one = _engine(d).generate([_engine(d).make_request(prompt_token_ids=prompt, sampling=GREEDY)])[0].token_ids
    engine = _engine(d)
    req = engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        n=3, max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True))
    engine.add_request(req)
    outs: dict[int, list[int]] = {}
    seqs = engine._groups[req.request_id]
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.index, []).extend(out.new_token_ids)
    assert [s.num_cached_tokens for s in seqs] == [0, 48, 48]  # 3 full blocks, each with a snapshot
    assert [outs[i] for i in range(3)] == [one] * 3
    assert engine.blocks.num_used == 0
