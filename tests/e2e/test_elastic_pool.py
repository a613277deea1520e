"""Expert pools of any shape and live rebalancing, through the real Ray actors and gloo group.

A 7-expert checkpoint runs on 2 and on 3 workers (no divisibility: the spare slots hold replicas),
with redundant replicas on top; then the pool rebalances three times under a Zipf-skewed load, adds
replica slots and removes them again, while a closed loop keeps 8 greedy streams running. Every
stream's tokens equal the single-process engine's."""

import os
import signal
import threading
import time

import pytest
import torch

from conftest import build_hf_checkpoint
from expert_workers.pool import ExpertPool
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.model.dispatch import ExpertsUnavailable
from mesh.types import SamplingParams

import ray  # noqa: E402

SP = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def seven_experts(tmp_path_factory):
    return build_hf_checkpoint("qwen3_moe", tmp_path_factory.mktemp("hf7") / "qwen3_moe_7", seed=3, num_experts=7)


def _prompts(n=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in torch.randint(2, 40, (n,), generator=g)]


@pytest.fixture(scope="module")
def reference(seven_experts):
    """Greedy tokens of the single-process engine, per prompt."""
    local = Engine(seven_experts, EngineConfig(dtype="float32"))
    prompts = _prompts()
    outs = local.generate([local.make_request(prompt_token_ids=p, sampling=SP) for p in prompts])
    return {tuple(p): o.token_ids for p, o in zip(prompts, outs)}


def _zipf_load(L, E, seed, s=1.3):
    """[L, E] rows per expert: Zipf-like, the hot experts in a different order per layer."""
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([base[torch.randperm(E, generator=g)] for _ in range(L)])


@pytest.mark.parametrize("workers,redundant", [(2, 0), (3, 0), (3, 2)])
def test_seven_experts_on_any_worker_count(workers, redundant, ray_cluster, seven_experts, reference):
    pool = ExpertPool(str(seven_experts), "float32", num_workers=workers, redundant=redundant)
    try:
        S = -(-(7 + redundant) // workers)
        assert pool.placement.slots_per_rank == S and (pool.placement.logcnt >= 1).all()
        dispatcher = pool.start()
        mesh = Engine(seven_experts, EngineConfig(dtype="float32", max_num_batched_tokens=48),
                      dispatcher=dispatcher)
        prompts = [list(p) for p in reference]
        outs = mesh.generate([mesh.make_request(prompt_token_ids=p, sampling=SP) for p in prompts])
        # every worker served rows, and replicated experts got rows on more than one of their slots
        per_rank = dispatcher.slot_load.view(dispatcher.L, workers, S).sum(-1)
        assert (per_rank.sum(0) > 0).all(), per_rank
        statuses = pool.statuses()
        assert [len(s["slots"][0]) for s in statuses] == [S] * workers
    finally:
        pool.shutdown()
    assert [o.token_ids for o in outs] == [reference[tuple(p)] for p in prompts]



def _streams_while(mesh, prompts, operator, max_rounds: int) -> list[list[list[int]]]:
    """Run `operator` (pool changes) in a thread while the 8 prompts are generated again and again
    (a closed loop, at least twice, until the operator is done); the operator's exception fails the
    test. Returns each round's token ids per prompt."""
    results, errors, done = [], [], threading.Event()

    def run():
        try:
            operator()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while not done.is_set() or len(results) < 2:
        outs = mesh.generate([mesh.make_request(prompt_token_ids=p, sampling=SP) for p in prompts])
        results.append([o.token_ids for o in outs])
        assert len(results) < max_rounds, "pool changes did not finish"
    t.join(60)
    assert not errors, errors
    return results


def _under_load(pool, model, reference, operator, max_rounds: int, what: str):
    """Start `pool`, run `operator(dispatcher)` while the reference prompts stream in a closed loop,
    stop the pool, and check every round of every stream against the reference. Returns the
    dispatcher and the workers' statuses as the operator left them."""
    prompts = [list(p) for p in reference]
    try:
        dispatcher = pool.start()
        mesh = Engine(model, EngineConfig(dtype="float32", max_num_batched_tokens=48), dispatcher=dispatcher)
        results = _streams_while(mesh, prompts, lambda: operator(dispatcher), max_rounds)
        statuses = pool.statuses()
    finally:
        pool.shutdown()
    want = [reference[tuple(p)] for p in prompts]
    assert all(r == want for r in results), f"a stream's tokens changed across {what}"
    return dispatcher, statuses


def test_live_rebalancing_under_load(ray_cluster, seven_experts, reference):
    """Three rebalances under Zipf loads, one from the measured window, a replica slot added and
    removed: all while 8 greedy streams run in a closed loop; every stream matches the reference."""
    pool = ExpertPool(str(seven_experts), "float32", num_workers=2)
    records = []

    def operator(dispatcher):
        for seed in (1, 2, 3):
            load = _zipf_load(dispatcher.L, 7, seed)
            # a skewed load on the current placement is badly balanced; rebalancing evens it out
            records.append(pool.rebalance(load))
        records.append(pool.rebalance(slots_per_rank=pool.placement.slots_per_rank + 1))  # add replicas
        records.append(pool.rebalance(slots_per_rank=pool.placement.slots_per_rank - 1))  # and remove

    dispatcher, statuses = _under_load(pool, seven_experts, reference, operator, 200, "a placement change")
    assert len(records) == 5 and all(r["changed"] for r in records), records
    for r in records[:3]:
        assert r["imbalance_after"] <= r["imbalance_before"], r
    assert records[0]["imbalance_after"] < records[0]["imbalance_before"]
    assert records[3]["slots_per_rank"] == 5 and records[4]["slots_per_rank"] == 4
    assert all(r["loaded_bytes"] > 0 and r["decision_to_serving_s"] > 0 for r in records)
    assert dispatcher.switches == 5 and [s["switches"] for s in statuses] == [5, 5]
    assert [len(s["slots"][0]) for s in statuses] == [4, 4]


def test_scale_two_three_one_two_under_load(ray_cluster, seven_experts, reference):
    """Workers added and removed at runtime (a new gloo group formed beside the serving one each time)
    while 8 greedy streams run in a closed loop; every stream matches the reference."""
    pool = ExpertPool(str(seven_experts), "float32", num_workers=2)
    records, shapes = [], []

    def operator(dispatcher):
        for w in (3, 1, 2):
            records.append(pool.scale(w))
            shapes.append((dispatcher.W, dispatcher.world, len(pool.actors)))

    dispatcher, statuses = _under_load(pool, seven_experts, reference, operator, 300, "a pool change")
    per_rank = dispatcher.slot_load.view(dispatcher.L, 2, -1).sum(-1)
    assert [r["workers_after"] for r in records] == [3, 1, 2] and all(r["changed"] for r in records)
    assert shapes == [(3, 4, 3), (1, 2, 1), (2, 3, 2)]
    assert [r["slots_per_rank"] for r in records] == [3, 9, 5]  # the 8 (then 9, then 9) slots spread out
    assert [s["state"] for s in statuses] == ["joined", "joined"]
    assert (per_rank.sum(0) > 0).all(), per_rank  # both workers of the final pool served rows


def test_worker_sigkilled_under_load_pool_reforms_and_regrows(ray_cluster, seven_experts, reference):
    """One of three workers (two replica slots) is SIGKILLed while 8 greedy streams run in a closed
    loop: the pool re-forms from the two survivors (the lost experts loaded into added slots) and grows
    back to three workers; every stream matches the reference, before, across and after the loss."""
    pool = ExpertPool(str(seven_experts), "float32", num_workers=3, redundant=2)
    victim = []

    def operator(dispatcher):
        while dispatcher.steps < 8:
            time.sleep(0.01)
        victim.append(pool.statuses()[1]["pid"])
        os.kill(victim[0], signal.SIGKILL)
        deadline = time.monotonic() + 180
        while not any(h["kind"] == "recover" and "restored" in h for h in pool.history):
            assert time.monotonic() < deadline, pool.history
            time.sleep(0.1)

    dispatcher, statuses = _under_load(pool, seven_experts, reference, operator, 400, "the lost worker")
    rec = [h for h in pool.history if h["kind"] == "recover"]
    assert len(rec) == 1 and rec[0]["lost_ranks"] == [1] and rec[0]["workers_after"] == 2, rec
    assert "process died" in rec[0]["reason"] and rec[0]["loaded_bytes"] > 0  # its experts moved to survivors
    assert rec[0]["restored"]["workers_after"] == 3 and rec[0]["restored"]["changed"]
    assert dispatcher.recoveries == 1 and dispatcher.W == 3
    assert [s["state"] for s in statuses] == ["joined"] * 3 and victim[0] not in {s["pid"] for s in statuses}
    assert [s["recoveries"] for s in statuses] == [1, 1, 0]  # the survivors re-formed; the new one joined after


def test_every_worker_lost_is_unavailable_in_the_products_words(ray_cluster, seven_experts, reference):
    pool = ExpertPool(str(seven_experts), "float32", num_workers=1)
    prompt = list(next(iter(reference)))
    try:
        dispatcher = pool.start()
        mesh = Engine(seven_experts, EngineConfig(dtype="float32"), dispatcher=dispatcher)
        assert mesh.generate([mesh.make_request(prompt_token_ids=prompt, sampling=SP)])[0].token_ids == \
            reference[tuple(prompt)]
        os.kill(pool.statuses()[0]["pid"], signal.SIGKILL)
        with pytest.raises(ExpertsUnavailable, match="every expert worker of this gateway is lost"):
            mesh.generate([mesh.make_request(prompt_token_ids=prompt, sampling=SP)])
    finally:
        pool.shutdown()
    assert pool.history[-1]["kind"] == "recover" and pool.history[-1]["workers_after"] == 0


def test_pressure_signals_name_what_is_over_its_bound():
    from expert_workers.policy import PolicyConfig, RebalancePolicy
    policy = RebalancePolicy(None, PolicyConfig(max_workers=4, max_queue_per_worker=2, ttft_slo_s=0.5,
                                                tpot_slo_s=0.05))
    assert policy.pressure(2) == []  # no signals from a gateway: nothing to watch
    seen = []
    policy.signals = lambda look_back: seen.append(look_back) or {"waiting": 5, "ttft_p90_s": 0.2,
                                                                  "tpot_p90_s": 0.08}
    assert policy.pressure(2) == ["5 requests waiting, above 2 per worker", "TPOT p90 80 ms above the 50 ms SLO"]
    assert seen == [PolicyConfig().look_back_period_s]
    assert policy.pressure(3) == ["TPOT p90 80 ms above the 50 ms SLO"]  # 5 waiting is within 2 x 3
    policy.config = PolicyConfig(max_workers=4)  # nothing watched: the signals are not even read
    assert policy.pressure(2) == [] and len(seen) == 2
    with pytest.raises(ValueError, match="ttft_slo_s"):
        PolicyConfig(ttft_slo_s=-1).validate()
