"""Fuzzing the gateway through real gRPC: hypothesis-generated requests (valid and out of range),
mutated serialized requests and arbitrary bytes, many cancelled streams and an overload. Afterwards
the server is SERVING, logged no traceback, and every KV block is back in the pool.

The number of generated examples per fuzz test is MESH_FUZZ_EXAMPLES (default 150, so the suite stays
short); `MESH_FUZZ_EXAMPLES=10000 pytest tests/router_service/test_fuzz.py` is the long run."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import LiveGateway, LogCapture, engine_factory
from router_service.client import MeshClient, MeshError
from router_service.protos import inference_pb2 as pb

EXAMPLES = int(os.environ.get("MESH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
# What a caller may be told; UNKNOWN, INTERNAL or UNAVAILABLE from a healthy server is a bug.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.DEADLINE_EXCEEDED}
U32, U64 = 2**32 - 1, 2**64 - 1


@pytest.fixture(scope="module")
def served(tiny_dir):
    cap = LogCapture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(cap)
    root.setLevel(logging.INFO)
    live = LiveGateway(engine_factory(tiny_dir), max_queued=64)
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


VOCAB = 512  # the tiny preset's
texts = st.text(max_size=40)

# Requests the server must serve: one prompt source, every field in range (max_tokens <= 6: quick).
valid_sampling = st.fixed_dictionaries({"max_tokens": st.integers(1, 6)}, optional=dict(
    temperature=st.floats(0, 2, width=32), top_p=st.floats(0.0625, 1, width=32),
    top_k=st.integers(-1, 50), seed=st.integers(0, U64), n=st.integers(1, 3), logprobs=st.integers(0, 3),
    presence_penalty=st.floats(-2, 2, width=32), frequency_penalty=st.floats(-2, 2, width=32),
    repetition_penalty=st.floats(0.5, 2, width=32), min_tokens=st.integers(0, 1), ignore_eos=st.booleans(),
    stop=st.lists(st.text(min_size=1, max_size=8), max_size=2)))
valid_prompt = st.one_of(st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=60).filter(str.strip)}),
                         st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                             max_size=40)}),
                         st.fixed_dictionaries({"fim": st.tuples(texts, texts)}))
valid = st.builds(lambda p, s, rid, stops, nocache: {**p, "sampling": s, "request_id": rid, "stop_token_ids": stops,
                                                      "disable_prefix_cache": nocache},
                  valid_prompt, valid_sampling, st.text(max_size=20),
                  st.lists(st.integers(0, VOCAB - 1), max_size=3), st.booleans())

# Anything the wire format can carry, in or far out of range.
wild_sampling = st.fixed_dictionaries({}, optional=dict(
    max_tokens=st.one_of(st.integers(0, 6), st.integers(0, U32)),
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_p=st.floats(allow_nan=True, allow_infinity=True, width=32), top_k=st.integers(-(2**31), 2**31 - 1),
    seed=st.integers(0, U64), n=st.one_of(st.integers(0, 3), st.integers(0, U32)),
    logprobs=st.one_of(st.integers(0, 3), st.integers(0, U32)), presence_penalty=st.floats(-3, 3, width=32),
    frequency_penalty=st.floats(allow_nan=True, width=32), repetition_penalty=st.floats(-1, 3, width=32),
    min_tokens=st.integers(0, U32), ignore_eos=st.booleans(), stop=st.lists(texts, max_size=3)))
wild = st.fixed_dictionaries({}, optional=dict(
    request_id=st.one_of(st.text(max_size=8), st.text(min_size=250, max_size=300)),
    prompt=st.text(max_size=60),
    prompt_token_ids=st.lists(st.one_of(st.integers(0, 600), st.integers(-(2**31), 2**31 - 1)), max_size=40),
    fim=st.tuples(texts, texts),
    stop_token_ids=st.lists(st.one_of(st.integers(0, 600), st.integers(0, U32)), max_size=3),
    disable_prefix_cache=st.booleans(), sampling=wild_sampling))


@st.composite
def one_bad_field(draw):
    """A valid request with one field replaced by a wild value."""
    r = draw(valid)
    w = draw(wild)
    key = draw(st.sampled_from(sorted(w))) if w else None
    if key == "sampling" and w["sampling"]:
        name = draw(st.sampled_from(sorted(w["sampling"])))
        r["sampling"] = {**r["sampling"], name: w["sampling"][name]}
    elif key is not None and key != "sampling":
        r[key] = w[key]
    return r


requests = st.one_of(valid, one_bad_field(), wild)


def _message(r: dict) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=r.get("request_id", ""), prompt=r.get("prompt", ""),
                             prompt_token_ids=r.get("prompt_token_ids", []), stop_token_ids=r.get("stop_token_ids", []),
                             disable_prefix_cache=r.get("disable_prefix_cache", False),
                             sampling=pb.SamplingParams(**r.get("sampling", {})))
    if r.get("fim") is not None:
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


def _send(channel, r: dict, streaming: bool) -> grpc.StatusCode:
    """Request `r` through Generate (streaming) or Complete; its status code."""
    return _raw_call(channel, "/mesh.v1.Inference/" + ("Generate" if streaming else "Complete"),
                     _message(r).SerializeToString(), streaming)


@FUZZ
@given(r=valid, streaming=st.booleans())
def test_valid_requests_are_served(served, r, streaming):
    assert _send(served[1], r, streaming) == grpc.StatusCode.OK, r


@FUZZ
@given(r=requests, streaming=st.booleans())
def test_generated_requests(served, r, streaming):
    code = _send(served[1], r, streaming)
    event(code.name)  # --hypothesis-show-statistics shows how many were served and how many refused


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
    live = LiveGateway(engine_factory(tiny_dir), max_queued=4)
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
