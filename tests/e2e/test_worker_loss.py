"""A lost expert worker, through a real `mesh serve --workers 3 --redundant-experts 2` (7 experts) over
gRPC: one worker's process is SIGKILLed while 8 greedy streams run. The gateway re-forms the pool from
the two survivors, the interrupted step's requests are recomputed from their tokens, the pool grows
back to three workers, and every stream completes with the single-process engine's tokens: no caller
sees an error and health stays SERVING."""

import os
import signal
import threading
import time

import pytest
import torch

from conftest import ADMIN_TOKEN, MeshServe, pool_checkpoint, watch_health
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.client import MeshClient, MeshError

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss")
    model, token = pool_checkpoint(d)
    server = MeshServe(d, "--model", str(model), "--workers", "3", "--redundant-experts", "2", "--dtype", "float32",
                       "--grace-period", "2", "--admin-token-file", str(token), admin_token=ADMIN_TOKEN)
    yield model, server
    assert server.stop() == 0, server.log()[-4000:]


def _prompts(n=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in torch.randint(2, 30, (n,), generator=g)]


def test_worker_sigkilled_mid_stream_under_eight_streams(served):
    model, server = served
    prompts = _prompts()
    local = Engine(model, EngineConfig(dtype="float32"))
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in local.generate([local.make_request(prompt_token_ids=p, sampling=sp)
                                                 for p in prompts])]
    stop = threading.Event()
    got: list[list] = [[] for _ in prompts]
    failures: list[str] = []
    health: list[str] = []
    streaming = [0] * len(prompts)  # tokens the stream in flight has received so far

    def stream(i):  # closed loop: one streamed greedy request after another
        c = MeshClient(server.target, timeout=120)
        while not stop.is_set():
            tokens = []
            try:
                for out in c.generate(prompt_token_ids=prompts[i], max_tokens=MAX_TOKENS, temperature=0,
                                      ignore_eos=True):
                    tokens += out.new_token_ids
                    streaming[i] = len(tokens)
            except MeshError as e:
                failures.append(f"stream {i}: {e}")
                continue
            got[i].append(tokens)
        c.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    threads.append(watch_health(server.target, stop, health))
    admin = server.client
    try:
        deadline = time.monotonic() + 120
        while sum(map(len, got)) < 8 or not any(0 < n < MAX_TOKENS for n in streaming):
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.05)
        before = admin.get_pool()
        assert before["num_workers"] == 3 and before.get("recoveries", 0) == 0
        victim = before["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)  # mid-stream: some streams have part of their tokens
        # the pool re-forms from two workers, then grows back to three
        deadline = time.monotonic() + 180
        while True:
            pool = admin.get_pool()
            if pool.get("recoveries") == 1 and pool["num_workers"] == 3 and \
                    all(w["state"] == "joined" for w in pool["workers"]):
                break
            assert time.monotonic() < deadline, (pool, server.log()[-3000:])
            time.sleep(0.5)
        served_after = sum(map(len, got))
        while sum(map(len, got)) < served_after + 16:  # two more rounds on the regrown pool
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    assert all(rounds and all(r == want[i] for r in rounds) for i, rounds in enumerate(got)), \
        "a stream's tokens changed across the lost worker"
    assert health and set(health) == {"SERVING"}, set(health)
    assert pool["lost_workers"] == 1 and pool["target_workers"] == 3
    assert victim["pid"] not in {w["pid"] for w in pool["workers"]}
    log = server.log()
    assert "re-formed with 2 workers" in log and "2 -> 3 workers" in log, log[-3000:]
