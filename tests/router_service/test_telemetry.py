"""Tracing and metrics: the span tree of a request through the gateway (W3C traceparent honoured),
step spans linked to request spans, expert-worker spans exported over real OTLP/gRPC as children of the
gateway's step spans across processes, and metric values after a known workload."""

import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh import telemetry as t
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.otlp_sink import OtlpSink
from conftest import LiveGateway

TRACE_ID, PARENT_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


@pytest.fixture(scope="module")
def otel():
    """The SDK with in-memory exporters, installed once for this test process."""
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    t.setup("mesh-gateway", span_exporter=spans, metric_reader=reader)
    if not isinstance(trace.get_tracer_provider(), __import__("opentelemetry.sdk.trace", fromlist=["x"]).TracerProvider):
        pytest.fail("another test installed a tracer provider first")
    yield spans, reader
    # The SDK cannot be uninstalled, but shut down it keeps nothing: tests that run later in this
    # process (in any order) do not pay for spans and metric points piling up in these exporters.
    t.shutdown()


def _flush():
    trace.get_tracer_provider().force_flush()


def _by_name(spans, name):
    return [s for s in spans if s.name == name]


def test_request_span_tree_honours_traceparent(otel, tiny_dir):
    spans_out, _ = otel
    _flush()  # spans of earlier tests still in the batch processor
    spans_out.clear()
    from router_service.protos import inference_pb2 as pb
    from router_service.protos import inference_pb2_grpc as pb_grpc
    gw = LiveGateway(lambda: Engine(tiny_dir, EngineConfig(dtype="float32", kv_cache_memory=4 << 20)))
    try:
        with grpc.insecure_channel(gw.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            req = pb.GenerateRequest(prompt="def add(a, b):\n    return", sampling=pb.SamplingParams(
                max_tokens=5, temperature=0, ignore_eos=True))
            resp = stub.Complete(req, metadata=[("traceparent", f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01")])
        assert len(resp.token_ids) == 5
    finally:
        gw.close()
    _flush()
    spans = spans_out.get_finished_spans()
    (server,) = _by_name(spans, "mesh.v1.Inference/Complete")
    assert server.kind == trace.SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID and server.parent.span_id == PARENT_ID
    children = {n: _by_name(spans, n) for n in (t.SPAN_QUEUE, t.SPAN_PREFIX_LOOKUP, t.SPAN_PREFILL, t.SPAN_DECODE)}
    for name, found in children.items():
        assert found, f"no {name} span"
        for s in found:
            assert s.context.trace_id == TRACE_ID and s.parent.span_id == server.context.span_id, name
    (decode,) = children[t.SPAN_DECODE]
    assert decode.attributes[t.ATTR_TOKENS] == 5
    assert [e.name for e in decode.events] == ["finish"]
    assert decode.events[0].attributes[t.ATTR_FINISH] == "length"
    steps = _by_name(spans, t.SPAN_STEP)
    assert len(steps) >= 5  # at least one prefill step and four decode steps
    linked = [s for s in steps if any(l.context.span_id == server.context.span_id for l in s.links)]
    assert len(linked) == len(steps)
    assert {s.attributes[t.ATTR_KIND] for s in linked} >= {"prefill", "decode"}
    assert all(s.attributes[t.ATTR_BATCH] == 1 for s in linked)
    # a prefill chunk links to the step that computed it
    step_ids = {s.context.span_id for s in steps}
    assert all(l.context.span_id in step_ids for p in children[t.SPAN_PREFILL] for l in p.links)


def test_http_requests_trace_like_grpc_calls(otel, tiny_dir):
    """An HTTP request's server span continues the caller's W3C traceparent header, and the engine's
    request spans hang under it, as under a gRPC call's."""
    import httpx2
    spans_out, _ = otel
    _flush()
    spans_out.clear()
    gw = LiveGateway(lambda: Engine(tiny_dir, EngineConfig(dtype="float32", kv_cache_memory=4 << 20)),
                     http_port=0, model_name="m")
    try:
        r = httpx2.post(f"http://127.0.0.1:{gw.gw.http_port}/v1/completions", json={
            "model": "m", "prompt": "def add(a, b):", "max_tokens": 3, "ignore_eos": True},
            headers={"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx2.post(f"http://127.0.0.1:{gw.gw.http_port}/v1/completions", json={"model": "m"},
                           headers={"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"}).status_code == 400
    finally:
        gw.close()
    _flush()
    spans = spans_out.get_finished_spans()
    ok, bad = _by_name(spans, "POST /v1/completions")
    for server in (ok, bad):
        assert server.kind == trace.SpanKind.SERVER
        assert server.context.trace_id == TRACE_ID and server.parent.span_id == PARENT_ID
    assert ok.attributes["http.response.status_code"] == 200 and bad.attributes["http.response.status_code"] == 400
    for name in (t.SPAN_QUEUE, t.SPAN_PREFILL, t.SPAN_DECODE):
        (child,) = _by_name(spans, name)
        assert child.parent.span_id == ok.context.span_id, name


def _metric(reader, name):
    points = []
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    points.extend(m.data.data_points)
    return points


def test_metric_values_after_a_known_workload(otel, hf_checkpoints):
    _, reader = otel
    d = hf_checkpoints["qwen3_moe"]  # 3 layers, 2 of them MoE, top-2
    import gc
    gc.collect()  # the observable sums over live engines: let finished tests' engines go first
    before = sum(p.value for p in _metric(reader, t.M_EXPERT_TOKENS))
    ttft_before = sum(p.count for p in _metric(reader, t.M_TTFT))

    def tokens():
        return {k: sum(p.value for p in _metric(reader, t.M_TOKENS) if p.attributes["kind"] == k)
                for k in ("prompt", "cached", "output")}

    tokens_before = tokens()
    engine = Engine(d, EngineConfig(dtype="float32"))
    prompts = [[1, 2, 3], list(range(10, 30)), [5] * 7]
    n_out = 4
    engine.generate([engine.make_request(prompt_token_ids=p, sampling=SamplingParams(
        max_tokens=n_out, temperature=0, ignore_eos=True)) for p in prompts])
    computed = sum(len(p) + n_out - 1 for p in prompts)  # the last sampled token is never fed back
    cfg = engine.model_config
    after = sum(p.value for p in _metric(reader, t.M_EXPERT_TOKENS))
    assert after - before == computed * cfg.top_k * cfg.num_moe_layers
    per_layer = {}
    for p in _metric(reader, t.M_EXPERT_TOKENS):
        per_layer[p.attributes["layer"]] = per_layer.get(p.attributes["layer"], 0) + 1
    assert set(per_layer.values()) == {cfg.num_experts}
    assert sum(p.count for p in _metric(reader, t.M_TTFT)) - ttft_before == len(prompts)
    got = tokens()
    assert {k: got[k] - tokens_before[k] for k in got} == {
        "prompt": sum(len(p) for p in prompts), "cached": 0, "output": n_out * len(prompts)}
    # the KV gauge follows the pool: blocks held while a request runs, given back when it is aborted
    idle = sum(p.value for p in _metric(reader, t.M_KV_USED))
    req = engine.make_request(prompt_token_ids=list(range(40, 90)), sampling=SamplingParams(max_tokens=50))
    engine.add_request(req)
    engine.step()
    held = sum(p.value for p in _metric(reader, t.M_KV_USED))
    assert held - idle == -(-50 // engine.config.block_size), (idle, held)
    engine.abort(req.request_id)
    assert sum(p.value for p in _metric(reader, t.M_KV_USED)) == idle
    del engine


def test_expert_worker_spans_are_children_of_step_spans_across_processes(otel, hf_checkpoints, monkeypatch):
    import ray
    from expert_workers.pool import ExpertPool
    spans_out, _ = otel
    _flush()  # spans of earlier tests still in the batch processor
    spans_out.clear()
    with OtlpSink() as sink:
        # what the gateway's environment says is what its workers get (runtime_env)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.setenv("MESH_TRACE_LAYER_EVERY", "1")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")  # workers push their counters too
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
        pool = ExpertPool(str(hf_checkpoints["mixtral"]), "float32", num_workers=2)
        try:
            engine = Engine(hf_checkpoints["mixtral"], EngineConfig(dtype="float32"), dispatcher=pool.start())
            root = t.tracer().start_span("client")
            ctx = trace.set_span_in_context(root)
            engine.generate([engine.make_request(prompt_token_ids=[4, 5, 6, 7], trace_context=ctx,
                                                 sampling=SamplingParams(max_tokens=3, temperature=0))])
            root.end()
            routed = int(engine.dispatcher.expert_load.sum())  # rows the gateway sent, all layers
        finally:
            pool.shutdown()  # workers flush their spans and metrics as they stop
            ray.shutdown()
        deadline = time.monotonic() + 60
        while not [s for s in sink.snapshot() if s.name == t.SPAN_EXPERT_STEP] and time.monotonic() < deadline:
            time.sleep(0.1)
        received = sink.snapshot()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the last export of each worker carries its final totals
            rows = {}
            for p in sink.metric_points():
                if p.metric == t.M_WORKER_ROWS:
                    rows[p.attributes[t.ATTR_RANK]] = p.value
            if sum(rows.values()) >= routed:
                break
            time.sleep(0.1)
        points = sink.metric_points()
    _flush()
    # each worker's row counter, exported over OTLP, adds up to what the gateway routed
    assert set(rows) == {0, 1} and sum(rows.values()) == routed > 0, (rows, routed)
    assert {p.service for p in points} == {"mesh-expert-worker"}
    assert {t.M_WORKER_STEPS, t.M_WORKER_COMPUTE, t.M_WORKER_BYTES} <= {p.metric for p in points}
    steps = {s.context.span_id: s for s in _by_name(spans_out.get_finished_spans(), t.SPAN_STEP)}
    worker_steps = [s for s in received if s.name == t.SPAN_EXPERT_STEP]
    assert worker_steps, "no expert-worker spans reached the OTLP receiver"
    assert {s.service for s in received} == {"mesh-expert-worker"}
    assert {s.attributes[t.ATTR_RANK] for s in worker_steps} == {0, 1}
    for s in worker_steps:
        assert s.parent_span_id in steps, "worker step span is not a child of a gateway step span"
        assert s.trace_id == steps[s.parent_span_id].context.trace_id
    # per-layer spans (sampled every step here) are children of the worker's step span
    layers = [s for s in received if s.name == t.SPAN_LAYER]
    ids = {s.span_id for s in worker_steps}
    assert layers and all(s.parent_span_id in ids for s in layers)
    # every gateway step reached both workers
    assert len(worker_steps) == 2 * len(steps)


def test_steps_linked_to_a_sampled_request_are_sampled():
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, TraceIdRatioBased
    from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

    def ctx(sampled):
        return SpanContext(trace_id=TRACE_ID, span_id=PARENT_ID, is_remote=True,
                           trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))

    s = t.LinkedSampler(TraceIdRatioBased(0.0))  # the configured sampler would keep no root at all
    step = dict(parent_context=None, trace_id=0x1234, name=t.SPAN_STEP)
    assert s.should_sample(**step, links=[Link(ctx(False)), Link(ctx(True))]).decision is Decision.RECORD_AND_SAMPLE
    assert s.should_sample(**step, links=[Link(ctx(False))]).decision is Decision.DROP
    assert s.should_sample(**step).decision is Decision.DROP
    # a span with a parent keeps the configured decision, links or not
    parent = trace.set_span_in_context(NonRecordingSpan(ctx(False)))
    assert t.LinkedSampler(ALWAYS_OFF).should_sample(parent, 0x1234, "x", links=[Link(ctx(True))]).decision \
        is Decision.DROP
    assert t.LinkedSampler(ALWAYS_ON).should_sample(None, 0x1234, "x").decision is Decision.RECORD_AND_SAMPLE
    assert "TraceIdRatioBased" in s.get_description()
