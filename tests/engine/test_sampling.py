"""Sampling options: penalties, min_tokens and logprobs in the batched sampler against per-row torch
references (transformers' own logits processors where it has them), and n completions sharing the
prompt's KV blocks in the engine, against transformers' generate on its own checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from conftest import hf_greedy
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.engine.sampler import apply_penalties, sample
from mesh.engine.sequence import Sequence
from mesh.types import FinishReason, InvalidRequest, Request, SamplingParams

V = 50


def _seq(prompt, output, **sp) -> Sequence:
    seq = Sequence(Request("r", list(prompt), SamplingParams(**sp)), arrival=0)
    seq.token_ids += list(output)
    return seq


def _reference_logits(logits: torch.Tensor, seq: Sequence, eos=()) -> torch.Tensor:
    """One row, written the plain way: transformers' repetition penalty over prompt + output, then
    OpenAI's frequency/presence formula token by token, then the min_tokens mask."""
    sp, x = seq.sampling, logits.clone()[None]
    if sp.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(torch.tensor([seq.token_ids]), x)
    x = x[0]
    for t in set(seq.output_token_ids):
        c = seq.output_token_ids.count(t)
        x[t] -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
    if seq.num_output_tokens < sp.min_tokens:
        for t in {*sp.stop_token_ids, *(() if sp.ignore_eos else eos)}:
            x[t] = float("-inf")
    return x


ROWS = [  # (prompt, output, sampling)
    ([1, 2, 3], [4, 4, 5], dict(temperature=0)),
    ([1, 2, 3], [4, 4, 5, 4], dict(temperature=0, repetition_penalty=1.7, logprobs=3)),
    ([7, 7], [8, 9, 8, 8], dict(temperature=0, frequency_penalty=0.9, presence_penalty=0.4, logprobs=0)),
    ([2], [3, 3], dict(temperature=0.7, top_k=10, seed=3, repetition_penalty=0.8, frequency_penalty=-1.5)),
    ([9, 10], [11], dict(temperature=0, min_tokens=3, stop_token_ids=(12,), logprobs=5)),
    ([9, 10], [11], dict(temperature=0, min_tokens=3, ignore_eos=True)),
    ([5, 6], [], dict(temperature=1.0, top_p=0.9, seed=11, presence_penalty=2, logprobs=1)),
]


def test_penalties_and_logprobs_match_the_per_row_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ROWS), V, generator=g) * 3
    seqs = [_seq(p, o, **sp) for p, o, sp in ROWS]
    eos = (0, 12 + 1)
    ref = torch.stack([_reference_logits(logits[i], s, eos) for i, s in enumerate(seqs)])
    got = apply_penalties(logits, seqs, eos)
    assert torch.equal(got[0], logits[0])  # rows without penalties are left alone
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)

    tokens, lps = sample(logits, seqs, torch.Generator().manual_seed(1), eos_token_ids=eos)
    for i, s in enumerate(seqs):
        if s.sampling.greedy:
            assert tokens[i] == int(ref[i].argmax())
        if s.sampling.logprobs is None:
            assert lps[i] is None
            continue
        want = torch.log_softmax(ref[i], -1)  # penalised logits, before temperature / top-k / top-p
        assert lps[i].token_id == tokens[i]
        assert lps[i].logprob == pytest.approx(float(want[tokens[i]]), abs=1e-5)
        top_v, top_i = want.topk(s.sampling.logprobs)
        assert [t for t, _ in lps[i].top] == top_i.tolist()
        assert [v for _, v in lps[i].top] == pytest.approx(top_v.tolist(), abs=1e-5)
    banned = {12, 0, 13}
    assert tokens[4] not in banned  # min_tokens not reached: neither a stop id nor eos


def test_seeded_rows_do_not_depend_on_the_batch_and_greedy_batches_do_no_extra_work():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(len(ROWS), V, generator=g) * 3
    together, _ = sample(logits, [_seq(p, o, **sp) for p, o, sp in ROWS])
    for i in (3, 6):  # the seeded, penalised, sampled rows
        p, o, sp = ROWS[i]
        alone, _ = sample(logits[i:i + 1], [_seq(p, o, **sp)])
        assert alone == [together[i]]
    plain = [_seq([1], [2], temperature=0) for _ in range(4)]
    assert sample(logits[:4], plain) == (logits[:4].argmax(-1).tolist(), None)


def test_sampling_params_are_validated():
    for kw, words in ((dict(n=0), "n must be"), (dict(n=17), "n must be"), (dict(logprobs=21), "logprobs"),
                      (dict(logprobs=-1), "logprobs"), (dict(presence_penalty=2.5), "presence_penalty"),
                      (dict(frequency_penalty=float("nan")), "frequency_penalty"),
                      (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_tokens=-1), "min_tokens"),
                      (dict(max_tokens=4, min_tokens=5), "min_tokens")):
        with pytest.raises(InvalidRequest, match=words):
            SamplingParams(**kw)


def _engine(model_dir, **kw):
    return Engine(model_dir, EngineConfig(**{"dtype": "float32", "kv_cache_memory": 4 << 20, **kw}))


def _hf_generate(model, prompt, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=None, **kw)
    return out[0, len(prompt):].tolist()


def test_engine_penalties_and_logprobs_match_transformers(hf_checkpoints, hf_models):
    model, engine = hf_models["qwen3_moe"], _engine(hf_checkpoints["qwen3_moe"])
    prompt = [3, 17, 17, 42, 3, 99, 17, 5]
    want = _hf_generate(model, prompt, max_new_tokens=12, repetition_penalty=1.5, eos_token_id=None)
    (got,) = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=12, temperature=0, repetition_penalty=1.5, ignore_eos=True))])
    assert got.token_ids == want and want != hf_greedy(model, prompt, 12)  # the penalty changed the output
    # min_tokens: transformers' min_new_tokens with the same end token
    plain = hf_greedy(model, prompt, 12)
    stop = plain[1]
    want = _hf_generate(model, prompt, max_new_tokens=12, eos_token_id=stop, min_new_tokens=5)
    (got,) = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=12, temperature=0, min_tokens=5, stop_token_ids=(stop,)))])
    assert got.token_ids == want and len(want) >= 5  # without min_tokens it would stop by the second token
    # logprobs: the log-softmax of transformers' logits at each generated position
    (got,) = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=6, temperature=0, logprobs=4, ignore_eos=True))])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got.token_ids])).logits[0, len(prompt) - 1:-1].float()
    ref = torch.log_softmax(logits, -1)
    for pos, lp in enumerate(got.logprobs):
        assert lp.logprob == pytest.approx(float(ref[pos, lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[pos].topk(4).indices.tolist()


@pytest.mark.parametrize("caching", [True, False])
def test_n_completions_share_the_prompt_blocks(hf_checkpoints, caching):
    engine = _engine(hf_checkpoints["qwen3_moe"], enable_prefix_caching=caching)
    prompt = list(range(1, 41))  # 2 full blocks of 16 + 8 tokens
    req = engine.make_request(prompt_token_ids=prompt, request_id="multi", sampling=SamplingParams(
        n=3, max_tokens=8, temperature=1.0, seed=42, ignore_eos=True))
    engine.add_request(req)
    outs = engine.step()  # the prompt once: one sequence
    assert [o.index for o in outs] == [0] and engine.blocks.num_used == 3
    outs = engine.step()  # the other two start from its 2 full blocks, computing only the 8-token tail
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert engine.blocks.num_used == 3 + 2 * 1
    seqs = engine._groups["multi"]
    assert seqs[1].block_ids[:2] == seqs[2].block_ids[:2] == seqs[0].block_ids[:2]
    assert seqs[1].num_cached_tokens == 32
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0  # every block back (cached ones stay reusable on the free list)
    assert all(engine.blocks.ref_count[b] == 0 for b in range(engine.blocks.num_blocks))
    results = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        n=3, max_tokens=8, temperature=1.0, seed=42, ignore_eos=True))])
    assert [r.index for r in results] == [0, 1, 2]
    assert len({tuple(r.token_ids) for r in results}) == 3  # different draws per completion
    assert all(r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 40 for r in results)
    (alone,) = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=8, temperature=1.0, seed=42, ignore_eos=True))])
    assert alone.token_ids == results[0].token_ids  # completion 0 draws from the seed itself
    greedy = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        n=2, max_tokens=8, temperature=0, ignore_eos=True))])
    (single,) = engine.generate([engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True))])
    assert greedy[0].token_ids == greedy[1].token_ids == single.token_ids  # shared blocks hold the same KV


def test_aborting_a_multi_completion_request_frees_everything(hf_checkpoints):
    engine = _engine(hf_checkpoints["qwen3_moe"], enable_prefix_caching=False)
    for steps in (0, 1, 3):  # before the prompt is computed, at the fork, mid-decode
        req = engine.make_request(prompt_token_ids=list(range(1, 50)), sampling=SamplingParams(
            n=4, max_tokens=50, temperature=0, ignore_eos=True))
        engine.add_request(req)
        for _ in range(steps):
            engine.step()
        assert engine.abort(req.request_id)
        assert not engine.has_unfinished() and engine.blocks.num_used == 0 and not engine._forks
        assert req.request_id not in engine._seqs and req.request_id not in engine._groups
    out = engine.generate([engine.make_request(prompt_token_ids=[1, 2], sampling=SamplingParams(
        n=2, max_tokens=1, temperature=0))])
    assert [r.finish_reason for r in out] == [FinishReason.LENGTH] * 2 and engine.blocks.num_used == 0


# --- the draw itself, against an independent numpy reference (conftest.reference_sampling_probs) ---

DRAWS = 20000
LOGITS = [2.0, 1.5, 1.2, 0.7, 0.3, 0.0, -0.4, -1.0, -1.5, -3.0]  # distinct, well-spread probabilities


def _draw(logits, n=DRAWS, seed=0, **sp) -> list[int]:
    """n draws from one row of logits, as n rows of one batch sharing one seeded generator."""
    row = torch.tensor(logits, dtype=torch.float32)
    seq = _seq([1], [], **sp)
    tokens, _ = sample(row.expand(n, -1).contiguous(), [seq] * n, torch.Generator().manual_seed(seed))
    return tokens


@pytest.mark.parametrize("sp", [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(temperature=1.0, top_k=4),
    dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.5, top_k=6, top_p=0.9),
], ids=lambda sp: ",".join(f"{k}={v}" for k, v in sp.items()))
def test_draws_follow_the_tempered_truncated_softmax(sp):
    from conftest import assert_matches_distribution, reference_sampling_probs
    want = reference_sampling_probs(LOGITS, sp["temperature"], sp.get("top_k", 0), sp.get("top_p", 1.0))
    assert_matches_distribution(_draw(LOGITS, **sp), want)


def test_the_reference_and_the_draws_disagree_when_the_settings_do():
    """The chi-square check has power: draws at one setting fail against another setting's reference."""
    from conftest import assert_matches_distribution, reference_sampling_probs
    draws = _draw(LOGITS, temperature=1.0)
    for other in (dict(temperature=0.8), dict(temperature=1.0, top_k=9), dict(temperature=1.0, top_p=0.97)):
        want = reference_sampling_probs(LOGITS, other["temperature"], other.get("top_k", 0), other.get("top_p", 1.0))
        with pytest.raises(AssertionError):
            assert_matches_distribution(draws, want)


def test_top_k_one_is_greedy():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, V, generator=g) * 2
    for temperature in (0.3, 1.0, 5.0):
        seqs = [_seq([1], [], temperature=temperature, top_k=1, seed=i) for i in range(64)]
        tokens, _ = sample(logits, seqs)
        assert tokens == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_head_reaching_p_and_drops_exactly_the_tail():
    import numpy as np
    probs = [0.5, 0.3, 0.15, 0.05]  # cumulative 0.5, 0.8, 0.95, 1.0
    logits = np.log(probs).tolist()
    for top_p, kept in ((0.3, {0}), (0.5, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}),
                        (0.94, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})):
        drawn = set(_draw(logits, n=4000, temperature=1.0, top_p=top_p))
        assert drawn == kept, f"top_p={top_p}: drew {sorted(drawn)}, the head reaching p is {sorted(kept)}"


def test_temperature_moves_the_entropy_the_right_way():
    import numpy as np
    from conftest import reference_sampling_probs

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    temps = (0.25, 0.5, 1.0, 2.0, 4.0)
    empirical = [entropy(np.bincount(_draw(LOGITS, temperature=t), minlength=len(LOGITS)) / DRAWS) for t in temps]
    reference = [entropy(reference_sampling_probs(LOGITS, t)) for t in temps]
    assert all(a < b for a, b in zip(empirical, empirical[1:])), empirical  # hotter: flatter
    assert all(a < b for a, b in zip(reference, reference[1:]))
    assert empirical == pytest.approx(reference, abs=0.03)


def test_penalties_shift_the_sampled_distribution():
    """With penalties the draws follow the reference softmax of the penalised logits."""
    from conftest import assert_matches_distribution, reference_sampling_probs
    prompt, output = [0, 1], [1, 2, 2]
    sp = dict(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3)
    seq = _seq(prompt, output, **sp)
    row = torch.tensor(LOGITS, dtype=torch.float32)
    penalised = _reference_logits(row, seq)
    n = DRAWS
    tokens, _ = sample(row.expand(n, -1).contiguous(), [seq] * n, torch.Generator().manual_seed(3))
    assert_matches_distribution(tokens, reference_sampling_probs(penalised.tolist(), 1.0))
    with pytest.raises(AssertionError):  # and not the unpenalised one
        assert_matches_distribution(tokens, reference_sampling_probs(LOGITS, 1.0))


def _next_token_logits(model, prompt) -> list[float]:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float().tolist()


def test_engine_first_tokens_follow_the_reference_distribution(hf_checkpoints, hf_models):
    """Through the engine (prefill, logits, sampler): first tokens of many seeded completions of one
    prompt against the reference distribution over transformers' next-token logits."""
    from conftest import assert_matches_distribution, reference_sampling_probs
    engine = _engine(hf_checkpoints["qwen3_moe"])
    prompt = [3, 17, 42, 99, 5]
    logits = _next_token_logits(hf_models["qwen3_moe"], prompt)
    for sp in (dict(temperature=2.0, top_k=8), dict(temperature=3.0, top_p=0.9)):
        reqs = [engine.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
            max_tokens=1, n=16, seed=s, ignore_eos=True, **sp)) for s in range(100)]
        draws = [r.token_ids[0] for r in engine.generate(reqs)]
        assert len(draws) == 1600
        want = reference_sampling_probs(logits, sp["temperature"], sp.get("top_k", 0), sp.get("top_p", 1.0))
        assert_matches_distribution(draws, want)
