"""The `mesh` CLI as a newcomer meets it: Hugging Face Hub ids resolved offline from a cache the test
lays out, engine flags refused with --target, one set of sampling defaults for the CLI and the APIs,
errors naming the flag, OpenTelemetry exporters as the specification names them, and `mesh serve
--http-port --log-format json` as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def _mesh(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mesh_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tmp_path_factory):
    """A Hugging Face cache holding `acme/tiny-coder` at two commits: `main` (seed 0 weights) and the
    tag `v1` (seed 1), laid out as huggingface_hub lays it out (refs/ name commits; snapshots/ hold files)."""
    from mesh.presets import init_model
    root = tmp_path_factory.mktemp("hf") / "hub"
    repo = root / "models--acme--tiny-coder"
    other = init_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("hf") / "seed1", seed=1)
    for ref, commit, src in (("main", "a" * 40, tiny_dir), ("v1", "b" * 40, other)):
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return root, other


def _greedy(model_dir, ids, n=5):
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_memory=4 << 20))
    return engine.generate([engine.make_request(prompt_token_ids=ids, sampling=SamplingParams(
        max_tokens=n, temperature=0, ignore_eos=True))])[0].token_ids


def test_hub_ids_resolve_offline_from_the_cache(hub_cache, tiny_dir):
    root, v1_dir = hub_cache
    env = {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    args = ("--prompt-ids", "5,6,7", "--max-tokens", "5", "--ignore-eos", "--dtype", "float32",
            "--kv-cache-memory", "4M", "--json")
    main = _mesh("generate", "--model", "acme/tiny-coder", *args, env=env)
    assert main.returncode == 0, main.stderr
    assert json.loads(main.stdout)["token_ids"] == _greedy(tiny_dir, [5, 6, 7])
    tag = _mesh("generate", "--model", "acme/tiny-coder", "--revision", "v1", *args, env=env)
    assert tag.returncode == 0, tag.stderr
    assert json.loads(tag.stdout)["token_ids"] == _greedy(v1_dir, [5, 6, 7])
    missing = _mesh("generate", "--model", "acme/other-model", *args, env=env)
    assert missing.returncode != 0 and "--model acme/other-model: not in the Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_rev = _mesh("generate", "--model", "acme/tiny-coder", "--revision", "v9", *args, env=env)
    assert bad_rev.returncode != 0 and "at revision v9" in bad_rev.stderr


def test_generate_target_refuses_engine_flags():
    for flags in (["--dtype", "float32"], ["--no-prefix-caching"], ["--kv-cache-memory=2G", "--revision", "x"]):
        out = _mesh("generate", "--target", "127.0.0.1:9", "--prompt", "x", *flags)
        assert out.returncode != 0 and "engine flags do not apply with --target" in out.stderr, out.stderr
        assert flags[0].split("=")[0] in out.stderr
    out = _mesh("generate", "--target", "127.0.0.1:9", "--prompt", "x", "--n", "0")
    assert out.returncode != 0 and "mesh: error: --n: n must be in [1, 16]" in out.stderr


def test_the_cli_and_the_apis_share_their_defaults():
    from mesh.cli import sampling_params
    from mesh_cli import build_parser
    from router_service import convert
    from router_service.protos import inference_pb2 as pb
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    cli = sampling_params(args)
    grpc_default = convert.sampling_from_pb(pb.GenerateRequest(prompt="x"))
    from router_service.openai_api import parse_completion
    http_default = parse_completion({"model": "m", "prompt": "x"}).sampling
    assert cli == grpc_default == http_default == SamplingParams()
    assert (cli.max_tokens, cli.temperature) == (64, 0.0)


def test_otel_exporters_as_the_specification_names_them(monkeypatch):
    from mesh import telemetry as t
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    assert t.trace_exporters() == [] and t.metric_exporters() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert t.trace_exporters() == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert t.trace_exporters() == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console, otlp")
    assert t.trace_exporters() == ["console", "otlp"]
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console,prometheus")
    assert t.metric_exporters() == ["console", "prometheus"]
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert t.trace_exporters() == [] == t.metric_exporters()
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(RuntimeError, match="OTEL_TRACES_EXPORTER=zipkin: unknown exporter 'zipkin'"):
        t.trace_exporters()
    # console prints spans and metrics to stdout and exits at once (no OTLP retries to a missing collector)
    code = ("from mesh import telemetry as t; t.setup('probe'); "
            "t.tracer().start_span('probe.span').end(); t.meter().create_counter('probe.count').add(3); "
            "t.shutdown()")
    # timeout: it must exit by itself (a 60 s bound is generous; the speed is not what is checked)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OTEL_TRACES_EXPORTER": "console",
                              "OTEL_METRICS_EXPORTER": "console"})
    assert out.returncode == 0, out.stderr
    assert '"name": "probe.span"' in out.stdout and '"name": "probe.count"' in out.stdout


def test_mesh_serve_http_with_json_logs(tiny_dir, tmp_path):
    import openai
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--model", str(tiny_dir), "--port", "0",
                             "--http-port", "0", "--dtype", "float32", "--kv-cache-memory", "4M", "--grace-period",
                             "0", "--log-format", "json", "--served-model-name", "coder"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "mesh serve: ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        listening = next(r["message"] for r in lines if "listening on" in r["message"])
        port = listening.split("HTTP (OpenAI API) on 127.0.0.1:")[1].split()[0]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        got = client.completions.create(model="coder", prompt="def f(x):", max_tokens=4,
                                        extra_body={"ignore_eos": True})
        assert got.usage.completion_tokens == 4
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    (access,) = [r for r in lines if r["logger"] == "mesh.access"]
    assert access["protocol"] == "http" and access["completion_tokens"] == 4 and access["status"] == "200"
    assert access["level"] == "INFO" and access["ttft_ms"] > 0 and access["finish_reason"] == "length"


def test_pool_and_admin_flags_are_checked(tmp_path):
    out = _mesh("serve", "--workers", "0", "--redundant-experts", "2", "--port", "0")
    assert out.returncode != 0 and "--redundant-experts needs --workers >= 1" in out.stderr, out.stderr
    out = _mesh("serve", "--workers", "2", "--redundant-experts", "-1", "--port", "0")
    assert out.returncode != 0 and "--redundant-experts must be 0 or more" in out.stderr, out.stderr
    empty = tmp_path / "token"
    empty.write_text("\n")
    out = _mesh("serve", "--admin-token-file", str(empty), "--port", "0")
    assert out.returncode != 0 and "--admin-token-file" in out.stderr and "is empty" in out.stderr, out.stderr
    out = _mesh("admin", "status", "--admin-token-file", str(tmp_path / "missing"))
    assert out.returncode != 0 and "--admin-token-file" in out.stderr and "Traceback" not in out.stderr
    out = _mesh("admin", "rebalance", "--slots-per-rank", "-2", "--target", "127.0.0.1:9")
    assert out.returncode != 0 and "--slots-per-rank must be 0 or more" in out.stderr
    out = _mesh("admin", "scale", "--workers", "0", "--target", "127.0.0.1:9")
    assert out.returncode != 0 and "--workers must be at least 1" in out.stderr
    out = _mesh("admin", "--help")
    assert out.returncode == 0 and "rebalance" in out.stdout and "autoscale" in out.stdout
