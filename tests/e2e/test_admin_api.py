"""mesh.v1.Admin on a real `mesh serve --workers 2` (7 experts) over gRPC, while a closed-loop client
keeps 8 greedy streams running: token checks, status, rebalances that add and remove replica slots,
the policy switched on and off, bad input refused; every stream matches the single-process engine,
no request fails and health stays SERVING. `mesh admin` runs against the same server."""

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from conftest import ADMIN_TOKEN, ROOT, MeshServe, pool_checkpoint, watch_health
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.client import MeshClient, MeshError

TOKEN = ADMIN_TOKEN


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("admin")
    model, token = pool_checkpoint(d)
    server = MeshServe(d, "--model", str(model), "--workers", "2", "--dtype", "float32", "--grace-period", "2",
                       "--admin-token-file", str(token), admin_token=TOKEN)
    yield model, server.client, server.port, token
    assert server.stop() == 0, server.log()[-4000:]


def _prompts(n=8, seed=21):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in torch.randint(2, 30, (n,), generator=g)]


def test_admin_api_under_load(served):
    model, client, port, token_file = served
    prompts = _prompts()
    local = Engine(model, EngineConfig(dtype="float32"))
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in local.generate([local.make_request(prompt_token_ids=p, sampling=sp)
                                                 for p in prompts])]
    stop = threading.Event()
    got: list[list] = [[] for _ in prompts]
    failures: list[str] = []
    health: list[str] = []

    def stream(i):  # one closed-loop greedy stream
        c = MeshClient(f"127.0.0.1:{port}", timeout=120)
        while not stop.is_set():
            try:
                got[i].append(c.complete(prompt_token_ids=prompts[i], max_tokens=6, temperature=0,
                                         ignore_eos=True)["token_ids"])
            except MeshError as e:
                failures.append(f"stream {i}: {e}")
        c.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    threads.append(watch_health(f"127.0.0.1:{port}", stop, health))
    try:
        # no token, a wrong token: UNAUTHENTICATED, and nothing changes
        for bad in (None, "wrong"):
            with pytest.raises(MeshError) as e:
                MeshClient(f"127.0.0.1:{port}", timeout=30, admin_token=bad).get_pool()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value
        while sum(map(len, got)) < 8:  # some traffic for the load window
            time.sleep(0.2)
        pool = client.get_pool()
        assert pool["num_workers"] == 2 and pool["slots_per_rank"] == 4 and pool["num_experts"] == 7
        assert len(pool["workers"]) == 2 and all(w["state"] == "joined" for w in pool["workers"])
        assert len(pool["layers"][0]["slots"]) == 8 and sum(pool["layers"][0]["replicas"]) == 8
        assert sum(int(x) for x in pool["layers"][0]["load"]) > 0
        changes = [client.rebalance(slots_per_rank=5), client.rebalance(), client.rebalance(slots_per_rank=4)]
        assert changes[0]["changed"] and changes[0]["slots_per_rank"] == 5 and int(changes[0]["loaded_bytes"]) > 0
        assert changes[2]["changed"] and changes[2]["slots_per_rank"] == 4
        after = client.get_pool()
        assert after["slots_per_rank"] == 4 and after["changes"] == sum(c["changed"] for c in changes)
        # a worker counts a switch once it has read the SWITCH header, which may be just after the gateway
        deadline = time.monotonic() + 30
        while not all(w["switches"] == after["changes"] for w in after["workers"]):
            assert time.monotonic() < deadline, after["workers"]
            time.sleep(0.2)
            after = client.get_pool()
        # bad input: named errors, nothing changes
        with pytest.raises(MeshError) as e:
            client.rebalance(slots_per_rank=3)  # 6 slots cannot hold 7 experts
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "at least 4" in e.value.details
        with pytest.raises(MeshError) as e:
            client.set_autoscaling(True, imbalance_threshold=0.5)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "imbalance_threshold" in e.value.details
        with pytest.raises(MeshError) as e:
            client.scale_pool(0)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(MeshError) as e:
            client.set_autoscaling(True, min_workers=3, max_workers=2)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "min_workers" in e.value.details
        # the operator scales 2 -> 3 -> 2 under load
        up = client.scale_pool(3)
        assert up["changed"] and up["workers"] == 3 and client.get_pool()["num_workers"] == 3
        down = client.scale_pool(2)
        assert down["changed"] and down["workers"] == 2
        # the rebalancing policy on: it may rebalance meanwhile; streams keep matching either way
        on = client.set_autoscaling(True, imbalance_threshold=1.05, look_back_period_s=1.0, interval_s=0.2)
        assert on["enabled"] and on["imbalance_threshold"] == pytest.approx(1.05)
        assert client.get_pool()["autoscaling"]["enabled"]
        time.sleep(2)

        def wait_for(size):
            deadline = time.monotonic() + 90
            while client.get_pool()["num_workers"] != size:
                assert time.monotonic() < deadline, f"the policy did not size the pool to {size}: {client.get_pool()}"
                time.sleep(0.5)

        # pressure: a TPOT SLO no step meets wants one worker more at a time, though the routed tokens
        # (against a huge per-worker target) want only min_workers
        on = client.set_autoscaling(True, imbalance_threshold=50, min_workers=1, max_workers=3,
                                    target_tokens_per_worker=1e9, upscale_delay_s=0.5, downscale_delay_s=0.5,
                                    look_back_period_s=2.0, interval_s=0.2, tpot_slo_s=1e-6)
        assert on["tpot_slo_s"] == pytest.approx(1e-6)
        wait_for(3)
        # sizing: a tiny per-worker target under load wants max_workers; a huge one wants min_workers
        off = client.set_autoscaling(True, target_tokens_per_worker=0.5, tpot_slo_s=0.0)
        assert "tpot_slo_s" not in off or off["tpot_slo_s"] == 0
        assert client.get_pool()["num_workers"] == 3  # under load: max_workers
        stop.set()  # the streams end: idle, the pool goes back down to min_workers
        for t in threads:
            t.join(120)
        wait_for(1)
        assert not client.set_autoscaling(False)["enabled"]
        pool = client.get_pool()
        assert pool["num_workers"] == 1 and len(pool["workers"]) == 1 and pool["workers"][0]["state"] == "joined"
        # the CLI, against the same server
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-m", "mesh_cli", "admin", "status", "--target", f"127.0.0.1:{port}",
                              "--admin-token-file", str(token_file)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["num_workers"] == 1
        out = subprocess.run([sys.executable, "-m", "mesh_cli", "admin", "status", "--target", f"127.0.0.1:{port}"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    assert set(health) == {"SERVING"}, health
    assert all(len(g) >= 2 for g in got), [len(g) for g in got]
    for i, outs in enumerate(got):
        assert all(o == want[i] for o in outs), f"stream {i} changed tokens: {outs} vs {want[i]}"
