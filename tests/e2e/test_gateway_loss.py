"""A lost gateway, survived by its clients: two `mesh serve` gateways (the tiny model), a client that
knows both, and the first gateway's process group SIGKILLed while four greedy streams run on it. Each
stream continues on the other gateway from the tokens it had (resume_token_ids) and ends with exactly
the tokens an uninterrupted stream gives; later calls go to the survivor; a plain gRPC channel with
the documented service config (round robin, UNAVAILABLE retried) serves through the dead address."""

import json
import os
import signal
import threading

import grpc
import pytest

from conftest import MeshServe
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.client import SERVICE_CONFIG, MeshClient
from router_service.protos import inference_pb2 as pb
from router_service.protos import inference_pb2_grpc as pb_grpc

MAX_TOKENS = 200
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "for i in range("]


@pytest.fixture
def two_gateways(tiny_dir, tmp_path):
    servers = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(MeshServe(tmp_path / name, "--model", str(tiny_dir), "--workers", "0", "--dtype",
                                     "float32", "--grace-period", "1"))
        yield servers
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()


def test_streams_resume_on_the_other_gateway_when_theirs_is_killed(two_gateways, tiny_dir):
    a, b = two_gateways
    local = Engine(tiny_dir, EngineConfig(dtype="float32"))
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in local.generate([local.make_request(prompt=p, sampling=sp) for p in PROMPTS])]
    started = [threading.Event() for _ in PROMPTS]
    got: list = [None] * len(PROMPTS)
    text: list = [""] * len(PROMPTS)
    clients = [MeshClient(f"{a.target},{b.target}", timeout=120) for _ in PROMPTS]

    def stream(i):
        tokens = []
        try:
            for out in clients[i].generate(prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True):
                tokens += out.new_token_ids
                text[i] += out.new_text
                started[i].set()
            got[i] = tokens
        except Exception as e:  # noqa: BLE001 - reported below
            got[i] = e
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    os.killpg(a.proc.pid, signal.SIGKILL)  # the gateway and everything it started, mid-stream
    a.proc.wait(10)
    for t in threads:
        t.join(120)
    assert got == want, [g if isinstance(g, Exception) else len(g) for g in got]
    assert all(c.target == b.target for c in clients) and sum(c.failovers for c in clients) == len(PROMPTS)
    # (text: the random-weight model emits invalid UTF-8 that a cut may split; tokens are the contract)
    assert all(text)
    # later calls: straight to the survivor (the dead address answers UNAVAILABLE: skipped)
    late = MeshClient(f"{a.target},{b.target}", timeout=60)
    assert late.complete(prompt=PROMPTS[0], max_tokens=8, temperature=0)["token_ids"] == want[0][:8]
    assert late.target == b.target and late.failovers == 1
    # any gRPC client: the documented service config over both addresses
    channel = grpc.insecure_channel(f"ipv4:{a.target},{b.target}",
                                    options=[("grpc.service_config", json.dumps(SERVICE_CONFIG))])
    stub = pb_grpc.InferenceStub(channel)
    for _ in range(4):
        msg = stub.Complete(pb.GenerateRequest(prompt=PROMPTS[1], sampling=pb.SamplingParams(max_tokens=8)),
                            timeout=60)
        assert list(msg.token_ids) == want[1][:8]
    channel.close()
    for c in clients + [late]:
        c.close()
