"""Fuzzing the gateway through real gRPC: hypothesis-generated requests (valid and out of range),
mutated serialized requests and arbitrary bytes, many cancelled streams and an overload. Afterwards
the server is SERVING, logged no traceback, and every KV block is back in the pool.

The number of generated examples per fuzz test is MESH_FUZZ_EXAMPLES (default 150, so the suite stays
short); `MESH_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py` is the long run."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_service.client import MeshClient, MeshError
from router_service.protos import inference_pb2 as pb
from test_security import LiveGateway, LogCapture, tiny_dir  # noqa: F401  (fixture)

EXAMPLES = int(os.environ.get("MESH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
# What a caller may be told; UNKNOWN, INTERNAL or UNAVAILABLE from a healthy server is a bug.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.DEADLINE_EXCEEDED}
U32, U64 = 2**32 - 1, 2**64 - 1


@pytest.fixture(scope="module")
def served(tiny_dir):  # noqa: F811
    cap = LogCapture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(cap)
    root.setLevel(logging.INFO)
    live = LiveGateway(tiny_dir, max_queued=64)
    channel = grpc.insecure_channel(live.target)
    yield live, channel, cap
    channel.close()
    live.close()
    root.removeHandler(cap)
    root.setLevel(old)


def _after(live, channel, cap):
    with MeshClient(live.target, channel=grpc.insecure_channel(live.target)) as c:
        assert c.health() == "SERVING"
    live.wait_idle(30)
    assert cap.tracebacks() == []
    assert not [r for r in cap.records if r.levelno >= logging.ERROR], [r.getMessage() for r in cap.records
                                                                       if r.levelno >= logging.ERROR]


def _optional(strategy):
    return st.one_of(st.none(), strategy)


texts = st.text(max_size=40)
sampling = st.builds(
    dict,
    max_tokens=_optional(st.one_of(st.integers(0, 6), st.integers(0, U32))),
    temperature=_optional(st.floats(allow_nan=True, allow_infinity=True, width=32)),
    top_p=_optional(st.floats(allow_nan=True, allow_infinity=True, width=32)),
    top_k=_optional(st.integers(-(2**31), 2**31 - 1)),
    seed=_optional(st.integers(0, U64)),
    n=_optional(st.one_of(st.integers(0, 3), st.integers(0, U32))),
    logprobs=_optional(st.one_of(st.integers(0, 3), st.integers(0, U32))),
    presence_penalty=_optional(st.floats(-3, 3, width=32)),
    frequency_penalty=_optional(st.floats(allow_nan=True, width=32)),
    repetition_penalty=_optional(st.floats(-1, 3, width=32)),
    min_tokens=_optional(st.integers(0, 8)),
    ignore_eos=st.booleans(),
    stop=st.lists(texts, max_size=3),
)
requests = st.builds(
    dict,
    request_id=st.one_of(st.text(max_size=8), st.text(min_size=250, max_size=300)),
    prompt=st.one_of(st.none(), st.text(max_size=60)),
    prompt_token_ids=st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 600), st.integers(0, U32)),
                                                    max_size=40)),
    fim=st.one_of(st.none(), st.tuples(texts, texts)),
    stop_token_ids=st.lists(st.one_of(st.integers(0, 600), st.integers(0, U32)), max_size=3),
    disable_prefix_cache=st.booleans(),
    sampling=sampling,
)


def _message(r: dict) -> pb.GenerateRequest:
    s = {k: v for k, v in r["sampling"].items() if v is not None}
    msg = pb.GenerateRequest(request_id=r["request_id"], prompt=r["prompt"] or "",
                             prompt_token_ids=r["prompt_token_ids"] or [], stop_token_ids=r["stop_token_ids"],
                             disable_prefix_cache=r["disable_prefix_cache"], sampling=pb.SamplingParams(**s))
    if r["fim"] is not None:
        msg.fim.prefix, msg.fim.suffix = r["fim"]
    return msg


def _raw_call(channel, method: str, payload: bytes, streaming: bool):
    """Send bytes as they are; returns the status code the call ended with."""
    ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        if streaming:
            for _ in channel.unary_stream(method, **ident)(payload, timeout=20):
                pass
        else:
            channel.unary_unary(method, **ident)(payload, timeout=20)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() in ACCEPTABLE, (e.code(), e.details())
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert e.details(), "an INVALID_ARGUMENT without a message"
        return e.code()


@FUZZ
@given(r=requests, streaming=st.booleans())
def test_generated_requests(served, r, streaming):
    live, channel, _ = served
    msg = _message(r)
    code = _raw_call(channel, "/mesh.v1.Inference/" + ("Generate" if streaming else "Complete"),
                     msg.SerializeToString(), streaming)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return
    assert code == grpc.StatusCode.OK


@FUZZ
@given(r=requests, data=st.data())
def test_mutated_and_arbitrary_bytes(served, r, data):
    live, channel, _ = served
    payload = bytearray(_message(r).SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "random"]))
        i = data.draw(st.integers(0, max(0, len(payload) - 1)))
        if op == "flip" and payload:
            payload[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and payload:
            del payload[i]
        elif op == "truncate":
            del payload[i:]
        elif op == "random":
            payload = bytearray(data.draw(st.binary(max_size=64)))
    method = data.draw(st.sampled_from(["Generate", "Complete", "Tokenize", "GetModelInfo"]))
    _raw_call(channel, f"/mesh.v1.Inference/{method}", bytes(payload), method == "Generate")


def test_fuzz_leaves_the_server_clean(served):
    """Runs after the two fuzz tests above (file order): health, logs and the KV pool."""
    _after(*served)


def test_a_thousand_cancelled_streams_leak_no_block(served):
    live, channel, cap = served
    stub_call = channel.unary_stream("/mesh.v1.Inference/Generate",
                                     request_serializer=pb.GenerateRequest.SerializeToString,
                                     response_deserializer=pb.GenerateResponse.FromString)
    seen = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        msg = pb.GenerateRequest(prompt_token_ids=[(i * 7 + j) % 500 + 1 for j in range(1 + i % 40)],
                                 sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True, n=1 + i % 2))
        call = stub_call(msg, timeout=60)
        if i % 3:  # after a first token; else at once
            next(call)
            with lock:
                seen[0] += 1
        call.cancel()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(1000)))
    assert seen[0] == sum(1 for i in range(1000) if i % 3)
    _after(live, channel, cap)


def test_overload_is_resource_exhausted(tiny_dir):  # noqa: F811
    live = LiveGateway(tiny_dir, max_queued=4)
    try:
        def one(i: int):
            with MeshClient(live.target, timeout=120) as c:
                try:
                    out = c.complete(prompt_token_ids=[1 + i, 2, 3], max_tokens=40, ignore_eos=True)
                    return len(out["token_ids"])
                except MeshError as e:
                    return e.code
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(one, range(40)))  # ten times what the server admits at once
        refused = [r for r in results if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
        served_ok = [r for r in results if r == 40]
        assert len(refused) + len(served_ok) == 40, results  # nothing else: no error, no lost request
        assert refused and len(served_ok) >= 4
        live.wait_idle(30)
        with MeshClient(live.target) as c:
            assert c.health() == "SERVING"
            assert len(c.complete(prompt_token_ids=[1, 2], max_tokens=3)["token_ids"]) == 3
    finally:
        live.close()
