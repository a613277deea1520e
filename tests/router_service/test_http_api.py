"""The OpenAI-compatible HTTP API against a real gateway on loopback (uvicorn in the gateway's event
loop beside grpc.aio), called with the official `openai` client: the same tokens as the gRPC path for
the same request, streaming and not, chat prompts rendered as transformers renders them, n and
logprobs, errors as OpenAI error objects with the right status, tenants, disconnects, access log."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from router_service.client import MeshClient
from conftest import LiveGateway, SlowEngine

CONFIG = dict(dtype="float32", kv_cache_memory=4 << 20)
MODEL = "tiny-coder"


def _engine(model_dir):
    return Engine(model_dir, EngineConfig(**CONFIG))


@pytest.fixture(scope="module")
def live(tiny_dir):
    gw = LiveGateway(lambda: SlowEngine(_engine(tiny_dir), 0.001), max_queued=6, http_port=0, model_name=MODEL)
    gw.base = f"http://127.0.0.1:{gw.gw.http_port}"
    yield gw
    gw.close()


def _client(live, **kw):
    return openai.OpenAI(base_url=live.base + "/v1", api_key="unused", max_retries=0, timeout=30, **kw)


def _grpc(live, **kw):
    with MeshClient(live.target, timeout=30) as c:
        return c.complete(**kw)


def test_completions_match_grpc_streaming_and_not(live):
    prompt = "def add(a, b):\n    return"
    want = _grpc(live, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
    client = _client(live)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    (choice,) = got.choices
    assert choice.text == want["text"] and choice.model_extra["token_ids"] == want["token_ids"]
    assert choice.finish_reason == "length" and got.object == "text_completion" and got.model == MODEL
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"] and got.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert len(chunks) > 3  # streamed, not one lump
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == want["token_ids"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the default (unset) sampling settings are the gRPC API's: 64 tokens, greedy
    default = client.completions.create(model=MODEL, prompt=prompt, extra_body={"ignore_eos": True})
    assert default.choices[0].text == _grpc(live, prompt=prompt, ignore_eos=True)["text"]
    assert default.usage.completion_tokens == 64
    live.wait_idle()


def test_fim_suffix_token_prompts_and_batches(live):
    client = _client(live)
    want = _grpc(live, fim=("def f(", "):\n    pass\n"), max_tokens=8, temperature=0, ignore_eos=True)
    got = client.completions.create(model=MODEL, prompt="def f(", suffix="):\n    pass\n", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == want["token_ids"]
    ids = [[5, 6, 7], [9, 10, 11, 12]]
    wants = [_grpc(live, prompt_token_ids=p, max_tokens=5, temperature=0, ignore_eos=True) for p in ids]
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.model_extra["token_ids"] for c in got.choices] == [w["token_ids"] for w in wants]
    assert got.usage.prompt_tokens == 7 and got.usage.completion_tokens == 10
    live.wait_idle()


def test_chat_uses_the_chat_template_and_matches_grpc(live, tiny_dir):
    from transformers import AutoTokenizer
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "A function that adds two numbers."}]
    rendered = AutoTokenizer.from_pretrained(tiny_dir).apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    want = _grpc(live, prompt=rendered, max_tokens=10, temperature=0, ignore_eos=True)
    client = _client(live)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want["text"]
    assert got.choices[0].model_extra["token_ids"] == want["token_ids"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"] and got.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    live.wait_idle()


def test_n_and_logprobs_agree_with_grpc(live):
    client = _client(live)
    want = _grpc(live, prompt="import os\n", max_tokens=6, temperature=0.8, seed=7, n=3, logprobs=2, ignore_eos=True)
    got = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0.8, seed=7, n=3,
                                    logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert len(got.choices) == 3 and len({tuple(c.model_extra["token_ids"]) for c in got.choices}) > 1
    for c, w in zip(got.choices, want["completions"]):
        assert c.model_extra["token_ids"] == w["token_ids"]
        assert c.logprobs.token_logprobs == pytest.approx([lp["logprob"] for lp in w["logprobs"]], abs=1e-5)
        # a dict by token text, as OpenAI's format has it: two byte tokens that each decode to U+FFFD share a key
        assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs)
        assert all(max(top.values()) == pytest.approx(w_lp["top"][0][1], abs=1e-5)
                   for top, w_lp in zip(c.logprobs.top_logprobs, w["logprobs"]))
        assert "".join(c.logprobs.tokens) == c.text and c.logprobs.text_offset[0] == 0
    assert got.usage.completion_tokens == 18
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)  # greedy: the likeliest
    live.wait_idle()


def test_models_health_and_errors(live):
    client = _client(live)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(live.base + "/health").status_code == 200
    bad = [  # (call, status, words in the message)
        (dict(model="gpt-4", prompt="x"), openai.NotFoundError, "does not exist here"),
        (dict(model=MODEL, prompt="x", max_tokens=0), openai.BadRequestError, "max_tokens must be at least 1"),
        (dict(model=MODEL, prompt="x", temperature=-1), openai.BadRequestError, "temperature"),
        (dict(model=MODEL, prompt="x", n=99), openai.BadRequestError, "n must be in"),
        (dict(model=MODEL, prompt="x", logprobs=50), openai.BadRequestError, "logprobs must be in"),
        (dict(model=MODEL, prompt="x", presence_penalty=3), openai.BadRequestError, "presence_penalty"),
        (dict(model=MODEL, prompt=[1, 99999]), openai.BadRequestError, "outside the vocabulary"),
        (dict(model=MODEL, prompt="x", echo=True), openai.BadRequestError, "echo is not supported"),
        (dict(model=MODEL, prompt=""), openai.BadRequestError, "prompt"),
    ]
    for kw, exc, words in bad:
        for stream in (False, True):
            with pytest.raises(exc) as e:
                client.completions.create(**kw, stream=stream)
            assert words in e.value.message, (kw, e.value.message)
            assert e.value.body["type"] and "message" in e.value.body
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    r = httpx.post(live.base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(live.base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such endpoint: GET /v1/nothing"
    assert live.stats()["in_flight"] == 0


def test_admission_limit_is_429_and_disconnect_frees_blocks(live):
    long = dict(model=MODEL, max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True})
    client = _client(live)
    streams = [client.completions.create(prompt=[i + 1, 2, 3], **long) for i in range(6)]
    for s in streams:
        next(iter(s))
    with pytest.raises(openai.RateLimitError, match="limit of 6"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    for s in streams:
        s.close()  # the client goes away mid-stream: the server aborts and frees the KV blocks
    live.wait_idle()


def test_tenants_keep_prefix_caches_apart_on_http(live):
    prompt = list(range(1, 70))
    a, b = (_client(live, default_headers={"x-tenant-id": t}) for t in ("acme", "globex"))
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1)
    assert a.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == 0
    assert a.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == 64
    assert b.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == 0
    live.wait_idle()


def test_one_access_line_per_request_on_both_protocols(live, caplog):
    with caplog.at_level(logging.INFO, logger="mesh.access"):
        _client(live, default_headers={"x-tenant-id": "t1"}).completions.create(
            model=MODEL, prompt="x = 1", max_tokens=3, extra_body={"ignore_eos": True})
        _grpc(live, prompt="x = 1", max_tokens=3, ignore_eos=True)
        with pytest.raises(openai.BadRequestError):
            _client(live).completions.create(model=MODEL, prompt="x", max_tokens=0)
        deadline = time.monotonic() + 30
        while len(caplog.records) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    http, grpc_, bad = (r.fields for r in caplog.records)
    assert http["protocol"] == "http" and http["method"] == "POST /v1/completions" and http["tenant"] == "t1"
    assert http["request_id"].startswith("cmpl-") and http["status"] == "200"
    assert http["completion_tokens"] == 3 and http["finish_reason"] == "length" and http["ttft_ms"] > 0
    assert grpc_["protocol"] == "grpc" and grpc_["method"].endswith("/Complete") and grpc_["status"] == "OK"
    assert grpc_["completion_tokens"] == 3 and grpc_["prompt_tokens"] == http["prompt_tokens"]
    assert bad["status"] == "400" and bad["ttft_ms"] is None


def test_http_is_503_until_loaded(tiny_dir):
    ready = threading.Event()
    gw = LiveGateway(lambda: _engine(tiny_dir), load=False, ready=ready.is_set, http_port=0, model_name=MODEL)
    base = f"http://127.0.0.1:{gw.gw.http_port}"
    try:
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError) as e:
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).completions.create(model=MODEL, prompt="x")
        assert e.value.status_code == 503
        ready.set()
        gw.loading.result(30)
        assert httpx.get(base + "/health").status_code == 200
    finally:
        gw.close()
    with pytest.raises(httpx.ConnectError):  # stopped with the gateway
        httpx.get(base + "/health", timeout=2)


def test_sse_wire_format(live):
    with httpx.stream("POST", live.base + "/v1/completions", json={
            "model": MODEL, "prompt": "def", "max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
