"""The engine through the Ray expert pool (gloo all-to-all) against the single-process engine and
transformers: identical greedy tokens for every family, with concurrent requests of different lengths."""

import os
import time

import pytest
import ray
import torch

from conftest import FAMILIES, hf_greedy
from expert_workers.pool import ExpertPool, PoolError
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


def _expert_bytes(model_dir, experts) -> int:
    """Bytes an expert worker holds for `experts` of every MoE layer, loaded and prepared by the same
    loader and backend in this process."""
    from mesh.model.backend import make_backend
    from mesh.config import ModelConfig
    from mesh.model.loader import load_experts
    cfg = ModelConfig.from_dir(model_dir)
    slots = [list(experts) for layer in range(cfg.num_layers) if cfg.moe_layers[layer]]
    shard = load_experts(model_dir, cfg, torch.float32, slots=slots)
    make_backend("auto", "cpu", cfg.rms_norm_eps, threads=1).prepare_experts(shard)
    return shard.nbytes


def _prompts(n=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in torch.randint(2, 60, (n,), generator=g)]


@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_matches_local_engine_and_transformers(family, ray_cluster, hf_checkpoints, hf_models):
    model_dir = hf_checkpoints[family]
    prompts = _prompts()
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    pool = ExpertPool(str(model_dir), "float32", num_workers=2)
    try:
        dispatcher = pool.start()
        # a worker marks itself joined just after the handshake that start() waited for: poll briefly
        deadline = time.monotonic() + 30
        while not pool.ready():
            assert time.monotonic() < deadline, pool.statuses()
            time.sleep(0.1)
        statuses = pool.statuses()
        assert [s["state"] for s in statuses] == ["joined", "joined"]
        # each worker loaded only its half of the experts: the bytes of experts 0-3 (4-7) of every
        # MoE layer loaded and prepared here, half of all eight's
        assert len({s["pid"] for s in statuses} | {os.getpid()}) == 3
        half = [_expert_bytes(model_dir, range(0, 4)), _expert_bytes(model_dir, range(4, 8))]
        assert half[0] + half[1] == _expert_bytes(model_dir, range(8)) and half[0] > 0
        assert [s["loaded_bytes"] for s in statuses] == half
        mesh = Engine(model_dir, EngineConfig(dtype="float32", max_num_batched_tokens=32, micro_batches=2),
                      dispatcher=dispatcher)
        assert mesh.dispatcher is dispatcher
        assert mesh.runner.micro_batches == 2  # two micro-batches in flight
        outs = mesh.generate([mesh.make_request(prompt_token_ids=p, sampling=sp) for p in prompts])
        # rows really went to both workers
        assert (dispatcher.slot_load.view(dispatcher.L, 2, -1).sum(-1) > 0).all()
    finally:
        pool.shutdown()
    assert not torch.distributed.is_initialized()
    local = Engine(model_dir, EngineConfig(dtype="float32"))
    ref_local = local.generate([local.make_request(prompt_token_ids=p, sampling=sp) for p in prompts])
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref_local]
    assert [o.token_ids for o in outs] == [hf_greedy(hf_models[family], p, 8) for p in prompts]


def test_a_worker_that_cannot_load_is_reported(ray_cluster, hf_checkpoints, tmp_path):
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(hf_checkpoints["qwen3_moe"], d)
    from safetensors.torch import load_file, save_file
    t = load_file(d / "model.safetensors")
    del t["model.layers.2.mlp.experts.7.down_proj.weight"]  # an expert that worker 1 holds
    save_file(t, d / "model.safetensors")
    pool = ExpertPool(str(d), "float32", num_workers=2, load_timeout=60)
    try:
        with pytest.raises((PoolError, ray.exceptions.RayTaskError), match="experts.7.down_proj.weight"):
            pool.start()
    finally:
        pool.shutdown()


def test_any_worker_count_places_every_expert(hf_checkpoints):
    # 8 experts on 3 workers: 3 slots each, the spare slot a replica (tests/e2e/test_elastic_pool.py
    # runs such pools); a negative replica count is refused naming the flag
    pool = ExpertPool(str(hf_checkpoints["mixtral"]), "float32", num_workers=3)
    assert pool.placement.slots_per_rank == 3 and (pool.placement.logcnt >= 1).all()
    with pytest.raises(ValueError, match="--redundant-experts must be 0 or more"):
        ExpertPool(str(hf_checkpoints["mixtral"]), "float32", num_workers=2, redundant=-1)
