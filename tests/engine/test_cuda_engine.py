"""The engine on a GPU with the cuda backend: decode steps replayed from CUDA graphs give the tokens
eager steps and transformers give, and a decode step reads nothing back to the host."""

import pytest
import torch

from conftest import DEVICE, FAMILIES, hf_greedy
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams

pytestmark = pytest.mark.gpu
if not DEVICE.startswith("cuda"):
    pytest.skip("needs a CUDA device (run with MESH_TEST_DEVICE=cuda)", allow_module_level=True)

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(path, **kw):
    return Engine(path, EngineConfig(dtype=kw.pop("dtype", "float32"), device=DEVICE, max_num_seqs=16, **kw))


def _prompts(n, vocab=128):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 60, (n,), generator=g)]


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_replays_match_eager_steps_and_transformers(family, hf_checkpoints, hf_models):
    prompts = _prompts(11)  # 11 rows: padded to the 16-row graph
    refs = [hf_greedy(hf_models[family], p, GREEDY.max_tokens) for p in prompts]
    outs = {}
    for eager in (False, True):
        engine = _engine(hf_checkpoints[family], enforce_eager=eager)
        assert engine.backend.name == "cuda"
        assert (engine.runner.graphs is None) == eager
        outs[eager] = [o.token_ids for o in engine.generate(
            [engine.make_request(prompt_token_ids=p, sampling=GREEDY) for p in prompts])]
        if not eager:
            assert engine.runner.graph_steps >= GREEDY.max_tokens - 2  # the decode steps replayed graphs
    assert outs[False] == outs[True] == refs


def test_a_decode_step_never_synchronises_with_the_host(hf_checkpoints):
    """The runner's whole decode step (inputs to the device, graph or eager forward, logits) under
    torch's sync debug mode "error": any device-to-host read would raise."""
    for eager in (False, True):
        engine = _engine(hf_checkpoints["qwen3_moe"], dtype="bfloat16", enforce_eager=eager)
        for p in _prompts(5):
            engine.add_request(engine.make_request(prompt_token_ids=p, sampling=GREEDY))
        engine.step()  # the prefill
        batch = engine.scheduler.schedule().scheduled
        assert batch and all(s.num_tokens == 1 for s in batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            samplers, logits = engine.runner.run(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert logits.shape == (5, engine.model_config.vocab_size) and torch.isfinite(logits).all()


def test_seeded_sampling_is_reproducible_across_graphs_and_eager(hf_checkpoints):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=11, ignore_eos=True)
    prompts = _prompts(6)
    runs = []
    for eager in (False, True):
        engine = _engine(hf_checkpoints["qwen3_moe"], enforce_eager=eager)
        runs.append([o.token_ids for o in engine.generate(
            [engine.make_request(prompt_token_ids=p, sampling=params) for p in prompts])])
    assert runs[0] == runs[1]
