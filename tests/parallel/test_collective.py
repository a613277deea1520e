"""The collective dispatcher against the local one, over real gloo process groups; placement units.

Each mesh case spawns A attention + W expert processes on 127.0.0.1. Attention ranks compare every
layer's combine output with LocalDispatcher on the same inputs, collect mismatches, and report them
only after a clean SHUTDOWN, so a numerical failure never turns into a hang.
"""

from __future__ import annotations

import os
import queue as queue_mod
import shutil
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.model.moe import ExpertShard, ExpertWeights, route
from mesh.parallel.collective import CollectiveDispatcher, ExpertServer, init_mesh_group
from mesh.parallel.local import LocalDispatcher
from mesh.parallel.placement import Placement, rebalance

E, K, H, I, L = 8, 2, 64, 32, 3
# MESH_TEST_DEVICE=cuda: every rank's rows and experts live on the GPU (the local reference stays on
# the CPU). MESH_TEST_BACKEND picks the process group's backend (gloo by default; nccl needs one GPU
# per rank, which a one-GPU machine cannot give).
DEVICE = os.environ.get("MESH_TEST_DEVICE", "cpu")
BACKEND = os.environ.get("MESH_TEST_BACKEND", "gloo")
SKEWED_LOAD = torch.tensor([[90, 1, 1, 1, 30, 1, 1, 5],
                            [1, 1, 1, 1, 1, 1, 1, 1],
                            [0, 0, 40, 40, 0, 0, 0, 70]], dtype=torch.float64)  # [L, E]


def make_experts(dtype: torch.dtype) -> ExpertShard:
    g = torch.Generator().manual_seed(0)
    return ExpertShard([ExpertWeights(gate_up=(torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype),
                                      down=(torch.randn(E, H, I, generator=g) * 0.1).to(dtype))
                        for _ in range(L)])


def take(full: ExpertShard, slots: list[list[int]]) -> ExpertShard:
    """The shard load_experts(slots=...) would build, cut from the full random one."""
    return ExpertShard([ExpertWeights(gate_up=w.gate_up[s], down=w.down[s]) for w, s in zip(full.layers, slots)])


# "switch" runs: the placement the attention rank switches to at this step (the experts stage it first)
SWITCH_AT = 2


def switched_placement(num_ranks: int) -> Placement:
    return rebalance(SKEWED_LOAD, num_ranks, E // num_ranks + 2)  # two replicas per rank, another layout


def make_placement(kind: str, num_ranks: int) -> Placement:
    if kind.startswith("contiguous"):
        return Placement.contiguous(L, E, num_ranks)
    if kind == "uneven":  # 8 experts on 3 ranks: 3 slots each, one expert replicated
        return Placement.initial(L, E, num_ranks)
    return rebalance(SKEWED_LOAD, num_ranks, E // num_ranks + 1)  # one redundant slot per rank


def layer_inputs(rank: int, step: int, layer: int, t: int, mode: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1000 * step + 10 * layer + rank)
    hidden = torch.randn(t, H, generator=g).to(dtype)  # [T, H]
    if mode == "skew":  # every token to experts 3 and 2, both on expert rank 0 when contiguous
        ids = torch.tensor([[3, 2]], dtype=torch.int64).expand(t, K)
        return hidden, ids, torch.softmax(torch.randn(t, K, generator=g), dim=-1)
    ids, weights = route(hidden @ torch.randn(E, H, generator=g).to(dtype).T, K, True, torch.float32)
    return hidden, ids, weights


def _attention(rank, A, placement, dtype, steps, kind=""):
    disp = CollectiveDispatcher(placement, A, H, dtype, device=DEVICE)
    full = make_experts(dtype)
    local = LocalDispatcher(full, E)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    errors = []
    for s, plan in enumerate(steps):
        if kind == "switch" and s == SWITCH_AT:
            done = disp.request_switch(switched_placement(disp.W))  # applied by the next begin_step
        t, mode = plan[rank]
        if mode == "idle":
            disp.idle_step()
            continue
        disp.begin_step(t)
        for layer in range(L):
            hidden, ids, weights = layer_inputs(rank, s, layer, t, mode, dtype)
            got = disp.combine(disp.dispatch(layer, hidden.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE))).cpu()
            want = local.combine(local.dispatch(layer, hidden, ids, weights))
            if got.shape != want.shape or got.dtype != want.dtype or \
                    not torch.allclose(got.float(), want.float(), atol=atol, rtol=atol):
                diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else None
                errors.append(f"step {s} layer {layer}: {tuple(got.shape)} {got.dtype} max diff {diff}")
        disp.end_step()
        if disp.step_bytes_sent <= 0:
            errors.append(f"step {s}: no bytes counted")
    disp.shutdown()
    if kind == "switch":
        if not (done.is_set() and disp.switches == 1 and disp.placement is not placement
                and disp.S == switched_placement(disp.W).slots_per_rank):
            errors.append(f"switch not applied: {disp.switches} switches, S={disp.S}")
    if local.expert_load is not None and not torch.equal(disp.expert_load, local.expert_load):
        errors.append(f"expert_load {disp.expert_load.tolist()} != {local.expert_load.tolist()}")
    return errors or "ok"


def _worker(rank, A, W, init_method, kind, dtype_name, steps, results):
    torch.set_num_threads(1)
    try:
        if DEVICE.startswith("cuda"):
            torch.cuda.set_device(torch.device(DEVICE).index or 0)
        init_mesh_group(init_method, A + W, rank, backend=BACKEND)
        placement, dtype = make_placement(kind, W), getattr(torch, dtype_name)
        if kind == "contiguous-bf16-experts" and rank >= A:
            dtype = torch.bfloat16  # a misconfigured worker: the handshake must fail on every rank
        if rank < A:
            report = _attention(rank, A, placement, dtype, steps, kind)
        else:
            def shard_for(p):
                shard = take(make_experts(dtype), p.local_slots(rank - A))
                return ExpertShard([ExpertWeights(gate_up=w.gate_up.to(DEVICE), down=w.down.to(DEVICE))
                                    for w in shard.layers])
            server = ExpertServer(shard_for(placement), placement, A, device=DEVICE)
            if kind == "switch":  # staged before serving here; a worker stages from another thread
                server.stage(switched_placement(W), shard_for(switched_placement(W)))
            report = ("served", server.run(), server.rows_served)
        dist.destroy_process_group()
        results.put((rank, report))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def run_mesh(A: int, W: int, kind: str, dtype_name: str, steps, timeout: float = 180.0,
             exit_code: int = 0) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # rendezvous through a file store in a fresh directory: no TCP port to pick and free beforehand
    # (one another process could take before rank 0 binds it)
    rendezvous = tempfile.mkdtemp(prefix="mesh-collective-")
    init_method = f"file://{rendezvous}/store"
    procs = [ctx.Process(target=_worker, args=(r, A, W, init_method, kind, dtype_name, steps, results), daemon=True)
             for r in range(A + W)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        reports = {}
        while True:
            try:
                rank, report = results.get(timeout=1.0)
            except queue_mod.Empty:
                break
            reports[rank] = report
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {timeout}s (hang); reports: {reports}"
        assert [p.exitcode for p in procs] == [exit_code] * (A + W), f"exit codes {[p.exitcode for p in procs]}: {reports}"
        return reports
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(rendezvous, ignore_errors=True)


def check(reports: dict, A: int, W: int, steps) -> None:
    for r in range(A):
        assert reports[r] == "ok", f"attention rank {r}: {reports[r]}"
    rows = L * sum(t * K for plan in steps for t, mode in plan if mode != "idle")
    served = [reports[A + w] for w in range(W)]
    assert all(s[0] == "served" and s[1] == len(steps) for s in served), served
    assert sum(s[2] for s in served) == rows, f"experts served {served}, attention sent {rows} rows over {L} layers"


def test_one_gateway_two_expert_ranks():
    # (tokens, routing) per attention rank per step: random, empty step, all-to-one-rank, one token
    steps = [[(5, "rand")], [(0, "rand")], [(7, "skew")], [(1, "rand")]]
    check(run_mesh(1, 2, "contiguous", "float32", steps), 1, 2, steps)


def test_two_gateways_replicated_experts():
    steps = [[(5, "rand"), (3, "rand")], [(4, "skew"), (0, "rand")], [(0, "idle"), (6, "skew")],
             [(2, "rand"), (9, "rand")], [(0, "idle"), (0, "idle")]]
    check(run_mesh(2, 2, "rebalanced", "float32", steps), 2, 2, steps)


def test_uneven_placement_eight_experts_on_three_ranks():
    steps = [[(5, "rand")], [(7, "skew")], [(1, "rand")], [(3, "rand")]]
    check(run_mesh(1, 3, "uneven", "float32", steps), 1, 3, steps)


def test_placement_switch_between_steps():
    # the attention rank switches to a staged placement with more slots before step SWITCH_AT; every
    # layer's output still matches the local dispatcher and every row is served exactly once
    steps = [[(5, "rand")], [(4, "skew")], [(6, "rand")], [(1, "rand")], [(3, "skew")]]
    check(run_mesh(1, 2, "switch", "float32", steps), 1, 2, steps)


def test_bf16_rows_over_gloo():
    steps = [[(6, "rand")], [(3, "skew")]]
    check(run_mesh(1, 2, "contiguous", "bfloat16", steps), 1, 2, steps)


def test_handshake_mismatch_fails_every_rank():
    reports = run_mesh(1, 1, "contiguous-bf16-experts", "float32", [], exit_code=1)
    assert all("mesh handshake: rank 1 has dtype=1, rank 0 has 0" in r for r in reports.values()), reports


def test_initial_placement_any_experts_on_any_ranks():
    for e, w, r in [(7, 2, 0), (7, 3, 0), (8, 3, 0), (8, 2, 1), (5, 4, 3), (7, 7, 0)]:
        p = Placement.initial(2, e, w, redundant=r)
        assert p.num_ranks == w and p.num_slots == w * -(-(e + r) // w)
        assert (p.logcnt >= 1).all() and (p.logcnt.sum(1) == p.num_slots).all()
        # every rank's slots hold distinct experts: the spare slots went to replicas on other ranks
        assert all(len(set(row)) == len(row) for r_ in range(w) for row in p.local_slots(r_)), p.describe()
    assert torch.equal(Placement.initial(3, 8, 2).phy2log, Placement.contiguous(3, 8, 2).phy2log)
    p = Placement.initial(1, 7, 2)  # 4 + 4 slots: one expert has two replicas, on both ranks
    assert p.logcnt[0].tolist().count(2) == 1
    e2 = p.logcnt[0].tolist().index(2)
    assert {p.rank_of_slot(int(s)) for s in p.log2phy[0, e2]} == {0, 1}
    with pytest.raises(ValueError, match="redundant experts must be >= 0"):
        Placement.initial(1, 7, 2, redundant=-1)


def test_moved_slots_counts_new_experts_per_rank():
    a = Placement.contiguous(1, 4, 2)  # [0 1 | 2 3]
    b = Placement(torch.tensor([[0, 2, 1, 3]]), 2, 2, 4)  # rank 0 gets 2, rank 1 gets 1
    assert a.moved_slots(b) == [1, 1] and a.moved_slots(a) == [0, 0]


def test_contiguous_placement():
    p = Placement.contiguous(L, E, 2)
    assert p.phy2log.tolist() == [list(range(E))] * L
    assert p.logcnt.tolist() == [[1] * E] * L
    assert p.log2phy[0, :, 0].tolist() == list(range(E))
    assert [p.rank_of_slot(s) for s in (0, 3, 4, 7)] == [0, 0, 1, 1]
    assert p.local_slots(1) == [[4, 5, 6, 7]] * L
    ids = torch.tensor([[0, 5], [7, 2]])
    assert torch.equal(p.choose_slots(1, ids), ids)
    with pytest.raises(ValueError, match="do not split evenly"):
        Placement.contiguous(L, 6, 4)
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        Placement.contiguous(L, E, 2, redundant=1)


def test_placement_validation():
    with pytest.raises(ValueError, match="no physical slot"):
        Placement(torch.tensor([[0, 1, 2, 2]]), 2, 2, 4)
    with pytest.raises(ValueError, match="expected num_ranks"):
        Placement(torch.tensor([[0, 1, 2]]), 2, 2, 3)
    with pytest.raises(ValueError, match="outside"):
        Placement(torch.tensor([[0, 1, 2, 4]]), 2, 2, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        rebalance(torch.ones(1, 8), 2, 3)


def test_replicas_spread_over_tokens():
    p = Placement.contiguous(1, E, 2, redundant=2)  # rank 0: 0-3 + copy of 4; rank 1: 4-7 + copy of 0
    assert p.local_slots(0) == [[0, 1, 2, 3, 4]] and p.local_slots(1) == [[4, 5, 6, 7, 0]]
    assert p.logcnt[0].tolist() == [2, 1, 1, 1, 2, 1, 1, 1]
    ids = torch.tensor([[0, 1]] * 4)  # [T=4, K]
    slots = p.choose_slots(0, ids)
    assert slots[:, 0].tolist() == [0, 9, 0, 9] and slots[:, 1].tolist() == [1] * 4
    assert p.choose_slots(0, ids, offset=1)[:, 0].tolist() == [9, 0, 9, 0]
    assert (p.phy2log[0][slots] == ids).all()


def test_rebalance_reduces_peak_rank_load():
    q = rebalance(SKEWED_LOAD, 2, 5)
    before = Placement.contiguous(L, E, 2).rank_load(SKEWED_LOAD).max(dim=1).values  # [L]
    after = q.rank_load(SKEWED_LOAD).max(dim=1).values
    assert (after <= before).all() and (after < before).any(), (before, after)
    assert (q.logcnt >= 1).all() and (q.logcnt.sum(1) == 10).all()
    assert q.logcnt[0, 0] >= 2  # the hottest expert got a replica...
    assert set(q.rank_of_slot(int(s)) for s in q.log2phy[0, 0] if s >= 0) == {0, 1}  # ...on the other rank
    assert torch.equal(rebalance(SKEWED_LOAD, 2, 5).phy2log, q.phy2log)  # deterministic


def test_heal_keeps_survivors_slots_and_places_every_lost_expert():
    p = Placement.initial(2, 7, 3, redundant=2)  # 3 slots per rank: 0 1 2 | 3 4 5 | 6 0 1
    assert p.local_slots(1) == [[3, 4, 5]] * 2
    load = torch.tensor([[1.0, 1, 1, 9, 1, 2, 1], [1.0, 1, 1, 1, 1, 1, 1]])
    q = p.heal({1}, load)  # experts 3, 4, 5 lived only on rank 1
    assert q.num_ranks == 2 and q.slots_per_rank == 5 and (q.logcnt >= 1).all()
    for new, old in ((0, 0), (1, 2)):  # the survivors keep their slots, renumbered, the added ones after
        assert [row[:3] for row in q.local_slots(new)] == p.local_slots(old)
    # layer 0: the heaviest lost expert (3) goes to the less loaded survivor first; every lost one placed
    assert {e for r in range(2) for e in q.local_slots(r)[0][3:]} >= {3, 4, 5}
    # a survivor never gets a second copy of an expert it holds while others are free to take
    assert all(len(set(row)) == len(row) for r in range(2) for row in q.local_slots(r))
    assert torch.equal(p.heal({1}, load).phy2log, q.phy2log)  # deterministic


def test_heal_with_surviving_replicas_moves_nothing():
    p = Placement(torch.tensor([[0, 1, 2, 3, 0, 1]]), 3, 2, 4)  # 0 1 | 2 3 | 0 1
    q = p.heal([2])  # experts 0 and 1 still live on rank 0
    assert q.phy2log.tolist() == [[0, 1, 2, 3]] and q.slots_per_rank == 2
    assert p.moved_slots(q) == [0, 0]
    with pytest.raises(ValueError, match="every rank is lost"):
        p.heal({0, 1, 2})
    with pytest.raises(ValueError, match="outside"):
        p.heal({3})
