"""The gRPC gateway over real gRPC on loopback: parity with the in-process engine, validation, KV
blocks freed on cancel/deadline, admission limits, health/readiness/drain, reflection, and `mesh
serve` / `mesh generate --target` as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from conftest import LiveGateway, SlowEngine
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.async_engine import AsyncEngine, EngineError
from router_service.client import MeshClient, MeshError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = dict(dtype="float32", kv_cache_memory=4 << 20)  # 8 KiB blocks of 16 tokens: a few hundred
LONG = dict(max_tokens=1500, temperature=0, ignore_eos=True)  # outlives any check below


def _engine(model_dir):
    return Engine(model_dir, EngineConfig(**CONFIG))


@pytest.fixture(scope="module")
def nofim_dir(hf_checkpoints, tmp_path_factory):
    """The transformers checkpoint plus a word-level tokenizer that has no FIM tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("gw") / "nofim"
    shutil.copytree(hf_checkpoints["qwen3_moe"], d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "x": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def hf(hf_checkpoints):
    """Gateway on transformers' own checkpoint (logits well separated: exact greedy parity; no tokenizer)."""
    live = LiveGateway(lambda: _engine(hf_checkpoints["qwen3_moe"]))
    yield live
    live.close()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    # 2 ms a step: a LONG request takes seconds, so a quick return of its blocks proves an abort
    live = LiveGateway(lambda: SlowEngine(_engine(tiny_dir), 0.002), max_queued=4)
    yield live
    live.close()


def _prompts(lengths, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_concurrent_streams_and_complete_match_the_engine(hf, hf_checkpoints):
    prompts = _prompts([1, 6, 17, 40, 70])
    max_tokens = [3, 9, 14, 6, 20]
    ref = _engine(hf_checkpoints["qwen3_moe"])
    expect = [r.token_ids for r in ref.generate([
        ref.make_request(prompt_token_ids=p, sampling=SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for p, m in zip(prompts, max_tokens)])]

    def stream(i):
        with MeshClient(hf.target, timeout=30) as c:
            return list(c.generate(prompt_token_ids=prompts[i], max_tokens=max_tokens[i], temperature=0,
                                   ignore_eos=True, request_id=f"s{i}"))

    def complete(i):
        with MeshClient(hf.target, timeout=30) as c:
            return c.complete(prompt_token_ids=prompts[i], max_tokens=max_tokens[i], temperature=0, ignore_eos=True)

    with ThreadPoolExecutor(10) as pool:
        streams = list(pool.map(stream, range(5)))
        completes = list(pool.map(complete, range(5)))
    for i, deltas in enumerate(streams):
        assert [t for d in deltas for t in d.new_token_ids] == expect[i]
        assert len(deltas) == max_tokens[i]  # streamed token by token, not in one lump
        assert all(d.request_id == f"s{i}" for d in deltas)
        assert [d.finished for d in deltas] == [False] * (max_tokens[i] - 1) + [True]
        assert deltas[-1].finish_reason.value == "length"
        assert deltas[-1].usage.completion_tokens == max_tokens[i]
        assert deltas[-1].usage.prompt_tokens == len(prompts[i])
        assert completes[i]["token_ids"] == expect[i]
        assert completes[i]["finish_reason"] == "length"
    hf.wait_idle()


def test_sampled_tokens_over_grpc_follow_the_reference_distribution(hf, hf_checkpoints, hf_models):
    """Temperature, top-k and top-p over real gRPC: first tokens of many seeded completions against
    the reference distribution over transformers' next-token logits, and each seed's draws equal the
    in-process engine's (a seeded request's draws do not depend on its batch)."""
    from conftest import assert_matches_distribution, reference_sampling_probs
    prompt = [3, 17, 42, 99, 5]
    with torch.no_grad():
        logits = hf_models["qwen3_moe"](torch.tensor([prompt])).logits[0, -1].float().tolist()
    sp = dict(temperature=2.5, top_k=10, top_p=0.95)
    seeds = range(60)

    def draw(seed):
        with MeshClient(hf.target, timeout=60) as c:
            out = c.complete(prompt_token_ids=prompt, max_tokens=1, n=16, seed=seed, ignore_eos=True, **sp)
        return [comp["token_ids"][0] for comp in out["completions"]]

    with ThreadPoolExecutor(4) as pool:
        draws = list(pool.map(draw, seeds))
    assert all(len(d) == 16 for d in draws)
    want = reference_sampling_probs(logits, sp["temperature"], sp["top_k"], sp["top_p"])
    assert_matches_distribution([t for d in draws for t in d], want)
    ref = _engine(hf_checkpoints["qwen3_moe"])
    local = ref.generate([ref.make_request(prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=1, n=16, seed=s, ignore_eos=True, **sp)) for s in seeds[:5]])
    assert [r.token_ids[0] for r in local] == [t for d in draws[:5] for t in d]
    hf.wait_idle()


def test_text_prompt_fim_tokenize_and_model_info(tiny, tiny_dir):
    ref = _engine(tiny_dir)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = "def add(a, b):\n    return"
    want = ref.generate([ref.make_request(prompt=prompt, sampling=greedy)])[0]
    fim_ids = ref.tokenizer.fim_prompt("def f(", "):\n    pass\n")
    want_fim = ref.generate([ref.make_request(prompt_token_ids=fim_ids, sampling=greedy)])[0]
    with MeshClient(tiny.target, timeout=30) as c:
        got = c.complete(prompt, max_tokens=12, temperature=0, ignore_eos=True)
        assert (got["token_ids"], got["text"]) == (want.token_ids, want.text)
        deltas = list(c.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True))
        assert "".join(d.new_text for d in deltas) == want.text
        fim = c.complete(fim=("def f(", "):\n    pass\n"), max_tokens=12, temperature=0, ignore_eos=True)
        assert fim["token_ids"] == want_fim.token_ids
        assert fim["usage"]["prompt_tokens"] == len(fim_ids)
        assert c.tokenize(prompt) == ref.tokenizer.encode(prompt)
        info = c.model_info()
    assert info["architecture"] == "Qwen3MoeForCausalLM" and info["family"] == "qwen3_moe"
    assert (info["vocab_size"], info["num_layers"], info["num_experts"], info["top_k"]) == (512, 2, 8, 2)
    assert (info["max_model_len"], info["dtype"], info["block_size"]) == (2048, "float32", 16)
    assert info["num_expert_workers"] == 0 and info["has_tokenizer"] and info["max_queued_requests"] == 4
    assert info["device"] == "cpu"
    tiny.wait_idle()


BAD = [  # (gateway, request kwargs, words the message must contain)
    ("hf", {}, "prompt is empty"),
    ("hf", dict(prompt_token_ids=[1, 128]), "outside the vocabulary"),
    ("hf", dict(prompt_token_ids=[-1]), "outside the vocabulary"),
    ("hf", dict(prompt_token_ids=[1], max_tokens=0), "max_tokens"),
    ("hf", dict(prompt_token_ids=[1], temperature=-0.5), "temperature"),
    ("hf", dict(prompt_token_ids=[1], top_p=0.0), "top_p"),
    ("hf", dict(prompt_token_ids=[1], top_p=1.5), "top_p"),
    ("hf", dict(prompt_token_ids=[1], top_k=-2), "top_k"),
    ("hf", dict(prompt_token_ids=[1] * 512), "at most 512 tokens"),
    ("hf", dict(prompt="def f():"), "no tokenizer"),
    ("hf", dict(fim=("a", "b")), "tokenizer"),
    ("hf", dict(prompt_token_ids=[1], stop=["\n"]), "tokenizer"),
    ("tiny", dict(prompt="x", prompt_token_ids=[1]), "exactly one prompt source"),
    ("tiny", dict(prompt_token_ids=[1], stop=[""]), "stop strings must be non-empty"),
    ("nofim", dict(fim=("def", "x")), "fill-in-the-middle tokens"),
]


@pytest.fixture(scope="module")
def nofim(nofim_dir):
    live = LiveGateway(lambda: _engine(nofim_dir))
    yield live
    live.close()


@pytest.mark.parametrize("gateway,kw,words", BAD, ids=[f"{g}-{w}" for g, _, w in BAD])
def test_bad_input_is_invalid_argument(gateway, kw, words, request):
    live = request.getfixturevalue(gateway)
    with MeshClient(live.target, timeout=10) as c:
        for call in (c.complete, lambda **k: list(c.generate(**k))):
            with pytest.raises(MeshError) as e:
                call(**kw)
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert words in e.value.details
    assert live.stats()["in_flight"] == 0


def test_tokenize_without_tokenizer_is_failed_precondition(hf):
    with MeshClient(hf.target) as c, pytest.raises(MeshError) as e:
        c.tokenize("def f():")
    assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION and "tokenizer.json" in e.value.details


def test_cancel_and_deadline_free_kv_blocks(tiny):
    with MeshClient(tiny.target) as c:
        gen = c.generate(prompt_token_ids=list(range(1, 40)), **LONG)
        next(gen), next(gen)
        assert tiny.stats()["in_flight"] == 1
        gen.close()  # cancels the call
        tiny.wait_idle(2.0)
        for call in (c.complete, lambda **k: list(c.generate(**k))):
            with pytest.raises(MeshError) as e:  # LONG outlives the deadline: the call is cut off by it
                call(prompt_token_ids=list(range(1, 40)), timeout=0.3, **LONG)
            assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            tiny.wait_idle(2.0)


def test_admission_limit_is_resource_exhausted(tiny):
    with MeshClient(tiny.target) as c:
        streams = [c.generate(prompt_token_ids=[i + 1, 2, 3], **LONG) for i in range(4)]
        for s in streams:
            next(s)  # admitted and running
        with pytest.raises(MeshError) as e:
            c.complete(prompt_token_ids=[1, 2, 3], max_tokens=2)
        assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 4" in e.value.details
        for s in streams:
            s.close()
        tiny.wait_idle()
        assert c.complete(prompt_token_ids=[1, 2, 3], max_tokens=2)["finish_reason"] == "length"


def test_health_and_reflection(tiny):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with MeshClient(tiny.target) as c:
        assert c.health() == "SERVING" and c.health("mesh.v1.Inference") == "SERVING"
    with grpc.insecure_channel(tiny.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="mesh.v1.Inference")]
        listed, files = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"mesh.v1.Inference", "mesh.v1.Admin", "grpc.health.v1.Health"} <= names
    assert files.file_descriptor_response.file_descriptor_proto


def test_admin_calls_need_the_token_and_a_pool(tiny, tiny_dir):
    # a gateway started without an admin token refuses every Admin call
    with pytest.raises(MeshError) as e:
        MeshClient(tiny.target, timeout=10, admin_token="anything").get_pool()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "--admin-token-file" in e.value.details
    live = LiveGateway(lambda: _engine(tiny_dir), admin_token="tok")
    try:
        for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("nope", grpc.StatusCode.UNAUTHENTICATED),
                            ("tok", grpc.StatusCode.FAILED_PRECONDITION)):
            with pytest.raises(MeshError) as e:
                MeshClient(live.target, timeout=10, admin_token=token).rebalance()
            assert e.value.code == code, e.value
        assert "--workers 0" in e.value.details  # the right token, but nothing to rebalance
        with MeshClient(live.target, timeout=10) as c:  # inference needs no admin token
            assert c.complete(prompt_token_ids=[1, 2, 3], max_tokens=2, temperature=0)["token_ids"]
    finally:
        live.close()


def test_not_serving_until_ready_then_drains_in_flight_streams(hf_checkpoints):
    ready, shut = threading.Event(), threading.Event()
    live = LiveGateway(lambda: SlowEngine(_engine(hf_checkpoints["qwen3_moe"])), load=False,
                       ready=ready.is_set, on_shutdown=shut.set, grace=10)
    c = MeshClient(live.target, timeout=10)
    try:
        assert c.health() == "NOT_SERVING"
        with pytest.raises(MeshError) as e:
            c.complete(prompt_token_ids=[1, 2])
        assert e.value.code is grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details
        ready.set()
        c.wait_ready(10)
        stream = c.generate(prompt_token_ids=[1, 2, 3], max_tokens=300, temperature=0, ignore_eos=True)
        first = next(stream)
        stopping = asyncio.run_coroutine_threadsafe(live.gw.stop(), live.loop)
        deadline = time.monotonic() + 30
        while c.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.health() == "NOT_SERVING"
        with pytest.raises(MeshError) as e:
            c.complete(prompt_token_ids=[1, 2])
        assert e.value.code is grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details
        rest = list(stream)  # the in-flight stream runs to its end within the grace period
        assert len(first.new_token_ids) + sum(len(d.new_token_ids) for d in rest) == 300
        assert rest[-1].finish_reason.value == "length"
        stopping.result(15)
        assert shut.is_set()
    finally:
        c.close()
        live.loop.call_soon_threadsafe(live.loop.stop)


class BrokenEngine(SlowEngine):
    def step(self):
        self._e.step()
        raise RuntimeError("expert worker 3 died")


def test_engine_thread_failure_reaches_every_caller(hf_checkpoints):
    async def main():
        ae = AsyncEngine(BrokenEngine(_engine(hf_checkpoints["qwen3_moe"])))

        async def outcome(i):  # refused at admission, or failed mid-stream: never left hanging
            try:
                async for _ in await ae.generate(ae.engine.make_request(prompt_token_ids=[1, 2],
                                                                        request_id=f"r{i}")):
                    pass
            except EngineError as e:
                return str(e)
        assert all("expert worker 3 died" in (r or "") for r in await asyncio.gather(*map(outcome, range(3))))
        with pytest.raises(EngineError):
            await ae.generate(ae.engine.make_request(prompt_token_ids=[1], request_id="late"))
        assert ae.stats()["in_flight"] == 0 and not ae.stats()["alive"]
    asyncio.run(asyncio.wait_for(main(), 20))


def _mesh(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mesh_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_mesh_serve_subprocess_remote_generate_and_sigterm(tiny_dir, tmp_path):
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESH_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--model", str(tiny_dir), "--dtype",
                             "float32", "--kv-cache-memory", "4M", "--grace-period", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        port = log.read_text().split("listening on 127.0.0.1:")[1].split()[0]
        target = f"127.0.0.1:{port}"

        ref = _engine(tiny_dir)
        want = ref.generate([ref.make_request(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(
            max_tokens=6, temperature=0, ignore_eos=True))])[0]
        out = _mesh("generate", "--target", target, "--prompt-ids", "5,6,7", "--max-tokens", "6",
                    "--ignore-eos", "--json")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert (got["token_ids"], got["text"], got["finish_reason"]) == (want.token_ids, want.text, "length")
        out = _mesh("generate", "--target", target, "--prompt", "def f(x):", "--max-tokens", "4")
        assert out.returncode == 0 and out.stdout.endswith("\n"), out.stderr
        out = _mesh("generate", "--target", target, "--prompt-ids", "1,99999")
        assert out.returncode == 1
        assert "mesh: error: INVALID_ARGUMENT: prompt token id 99999 is outside" in out.stderr

        with MeshClient(target, timeout=30) as c:
            stream = c.generate(prompt_token_ids=[1, 2, 3], **LONG)
            next(stream)
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert rest[-1].finish_reason.value == "abort"  # --grace-period 0: aborted, and told so
        proc.wait(60)  # a generous bound: it exits on its own, not only when killed
        assert proc.returncode == 0, log.read_text()
        with pytest.raises(ProcessLookupError):  # nothing of its process group is left
            os.killpg(proc.pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_device_flag_is_checked_and_used(tiny_dir):
    out = _mesh("generate", "--model", str(tiny_dir), "--prompt-ids", "1,2", "--device", "tpu")
    assert out.returncode != 0 and "--device 'tpu': expected cpu, cuda, cuda:N or auto" in out.stderr
    if not torch.cuda.is_available():
        out = _mesh("generate", "--model", str(tiny_dir), "--prompt-ids", "1,2", "--device", "cuda")
        assert out.returncode != 0 and "--device cuda: torch sees no CUDA device" in out.stderr
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = _mesh("generate", "--model", str(tiny_dir), "--prompt-ids", "5,6,7", "--max-tokens", "4", "--ignore-eos",
                "--temperature", "0", "--dtype", "float32", "--device", device, "--json")
    assert out.returncode == 0, out.stderr
    engine = Engine(tiny_dir, EngineConfig(dtype="float32"))  # the CPU reference
    want = engine.generate([engine.make_request(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True))])[0]
    assert json.loads(out.stdout)["token_ids"] == want.token_ids
