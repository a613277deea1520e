"""Two gateways on one expert pool: `mesh serve --workers 2` (7 experts) and `mesh serve --join` onto
it, each serving greedy streams with the single-process engine's tokens, through a rebalance, a
scale-up, a worker SIGKILLed (the owner re-forms its pool; the joined gateway attaches again) and a
scale-down on the owner, and the owner still serving after the joined gateway is SIGKILLed."""

import os
import signal
import threading
import time

import pytest
import torch

from conftest import ADMIN_TOKEN, MeshServe, pool_checkpoint
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.client import MeshClient, MeshError

def _prompts(n=6, seed=13):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in torch.randint(2, 30, (n,), generator=g)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("join")
    model, token = pool_checkpoint(d)
    (d / "owner").mkdir()
    (d / "joined").mkdir()
    owner = MeshServe(d / "owner", "--model", str(model), "--workers", "2", "--dtype", "float32", "--grace-period",
                      "1", "--admin-token-file", str(token), admin_token=ADMIN_TOKEN)
    try:
        joined = MeshServe(d / "joined", "--model", str(model), "--join", owner.target, "--dtype", "float32",
                           "--grace-period", "1", "--admin-token-file", str(token))
    except BaseException:
        owner.stop()
        raise
    yield model, owner, joined
    if joined.proc.poll() is None:
        joined.stop()
    assert owner.stop() == 0, owner.log()[-4000:]


def test_two_gateways_share_one_pool_through_changes_and_a_lost_gateway(pair):
    model, owner, joined = pair
    prompts = _prompts()
    local = Engine(model, EngineConfig(dtype="float32"))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in local.generate([local.make_request(prompt_token_ids=p, sampling=sp)
                                                 for p in prompts])]
    assert MeshClient(joined.target).model_info()["num_expert_workers"] == 2
    stop = threading.Event()
    got = {"owner": [], "joined": []}
    failures: list[str] = []

    def loop(name, target, i):  # closed loop on one gateway
        c = MeshClient(target, timeout=120)
        while not stop.is_set():
            try:
                out = c.complete(prompt_token_ids=prompts[i], max_tokens=8, temperature=0, ignore_eos=True)
                got[name].append((i, out["token_ids"]))
            except MeshError as e:
                if name == "joined" and stop_joined.is_set():
                    return  # it was killed on purpose
                failures.append(f"{name} {i}: {e}")
        c.close()

    stop_joined = threading.Event()
    threads = [threading.Thread(target=loop, args=(n, s.target, i), daemon=True)
               for n, s in (("owner", owner), ("joined", joined)) for i in range(3)]
    for t in threads:
        t.start()

    def served(name, more, timeout=120):
        n, deadline = len(got[name]), time.monotonic() + timeout
        while len(got[name]) < n + more:
            assert time.monotonic() < deadline and not failures, (failures, joined.log()[-3000:])
            time.sleep(0.1)

    try:
        served("owner", 6)
        served("joined", 6)
        admin = owner.client
        assert admin.rebalance(slots_per_rank=5)["changed"]  # the owner's group moves; the joined one keeps its experts
        served("joined", 6)
        assert admin.scale_pool(3)["workers"] == 3
        served("joined", 6)
        # worker 1 is SIGKILLed: the owner re-forms its pool and grows it back to 3; the joined gateway's
        # group (workers 0 and 1) breaks and it attaches again to the re-formed pool
        os.kill(admin.get_pool()["workers"][1]["pid"], signal.SIGKILL)
        served("joined", 12)
        served("owner", 12)
        assert "attaching again" in joined.log()
        deadline = time.monotonic() + 120
        while (p := admin.get_pool()).get("recoveries") != 1 or p["num_workers"] != 3:
            assert time.monotonic() < deadline, p
            time.sleep(0.5)
        assert admin.scale_pool(1)["workers"] == 1  # workers leave: the joined gateway attaches once more
        served("joined", 12)
        assert joined.log().count("attaching again") >= 2
        stop_joined.set()
        os.killpg(joined.proc.pid, signal.SIGKILL)
        joined.proc.wait(10)
        served("owner", 12)  # the owner goes on without it
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    for name in ("owner", "joined"):
        assert all(tokens == want[i] for i, tokens in got[name]), f"{name}: tokens changed"
