"""Tracing and metrics: the tracer and meter getters, and every span, attribute and metric name.

Only the OpenTelemetry API is used on hot paths. With nothing configured the API's no-op tracer and
meter cost a function call each; `setup()` installs the SDK where the standard `OTEL_*` variables
ask for it, as the OpenTelemetry specification defines them:
- `OTEL_TRACES_EXPORTER`: a comma-separated list of `otlp`, `console` (spans printed to stdout as they
  end) and `none`. Unset: `otlp` when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`
  or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), else no tracing: the specification's default is `otlp`,
  but a server that nobody configured should not send spans to a collector that is not there.
- `OTEL_METRICS_EXPORTER`: `otlp` (every `OTEL_METRIC_EXPORT_INTERVAL` ms), `console`, `prometheus`
  (an endpoint on `OTEL_EXPORTER_PROMETHEUS_HOST`:`OTEL_EXPORTER_PROMETHEUS_PORT`, default
  localhost:9464) and `none`. Unset: none; `--metrics-port` adds a Prometheus endpoint either way.
- `OTEL_SDK_DISABLED=true`: nothing is installed. Also read: `OTEL_EXPORTER_OTLP_PROTOCOL`,
  `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SERVICE_NAME`, `OTEL_BSP_*` and the exporters' own variables.
An unknown exporter name is an error (RuntimeError naming the variable), not a silent no-op.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import metrics, trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger("mesh.telemetry")
SCOPE = "moe-mesh"

# ---- span names -------------------------------------------------------------------------------
SPAN_QUEUE = "mesh.queue"  # admission wait, per request
SPAN_PREFIX_LOOKUP = "mesh.prefix_cache.lookup"  # attributes: tokens hit per tier
SPAN_PREFILL = "mesh.prefill"  # one per prefill chunk
SPAN_DECODE = "mesh.decode"  # the request's decode phase; attribute: tokens
SPAN_STEP = "mesh.engine.step"  # one per engine step; links to the requests it served
SPAN_LAYER = "mesh.moe.layer"  # per-MoE-layer detail, sampled (MESH_TRACE_LAYER_EVERY)
SPAN_EXPERT_STEP = "mesh.expert.step"  # an expert worker serving one step (child of SPAN_STEP)
SPAN_POOL_CHANGE = "mesh.pool.change"  # a placement change of the expert pool, with its reason

# ---- attribute names --------------------------------------------------------------------------
ATTR_REQUEST_ID = "mesh.request_id"
ATTR_BATCH = "mesh.batch_size"
ATTR_TOKENS = "mesh.tokens"
ATTR_KIND = "mesh.step.kind"  # prefill | decode | mixed
ATTR_HIT_LOCAL = "mesh.prefix_cache.local_tokens"
ATTR_HIT_REMOTE = "mesh.prefix_cache.remote_tokens"
ATTR_FINISH = "mesh.finish_reason"
ATTR_RANK = "mesh.expert.rank"
ATTR_NODE = "mesh.node"
ATTR_LAYER = "mesh.moe.layer"

# ---- metric names -----------------------------------------------------------------------------
M_TTFT = "mesh.time_to_first_token"  # histogram, s
M_TPOT = "mesh.time_per_output_token"  # histogram, s
M_E2E = "mesh.request.duration"  # histogram, s
M_QUEUE_DEPTH = "mesh.queue.depth"  # gauge: waiting requests
M_RUNNING = "mesh.requests.running"  # gauge
M_KV_USED = "mesh.kv.blocks.used"  # gauge
M_KV_FREE = "mesh.kv.blocks.free"  # gauge
M_PREFIX_HITS = "mesh.prefix_cache.hit_tokens"  # counter, attribute tier=local|redis
M_EXPERT_TOKENS = "mesh.expert.tokens"  # counter, attributes layer, expert
M_TIER_BYTES = "mesh.prefix_cache.tier.bytes"  # counter, attributes tier, direction
M_TIER_CALLS = "mesh.prefix_cache.tier.calls"  # counter, attributes tier, kind (lookups, hits, errors, ...)
M_TIER_LATENCY = "mesh.prefix_cache.tier.read_latency"  # gauge, s (median of recent reads)
M_DISPATCH_SECONDS = "mesh.dispatch.duration"  # histogram, s per MoE layer (dispatch + combine)
M_DISPATCH_BYTES = "mesh.dispatch.bytes"  # counter
M_WORKER_UP = "mesh.expert_worker.up"  # gauge per rank: 1 joined, 0 otherwise
M_POOL_DECISIONS = "mesh.pool.decisions"  # counter, attributes action (rebalance|none), reason
M_POOL_IMBALANCE = "mesh.pool.imbalance"  # gauge: max/mean rows per worker over the load window
M_TOKENS = "mesh.tokens"  # counter, attribute kind=prompt|cached|output (cached: prompt tokens not recomputed)
# exported by each expert worker (attribute mesh.expert.rank)
M_WORKER_STEPS = "mesh.expert_worker.steps"  # counter: steps served
M_WORKER_ROWS = "mesh.expert_worker.rows"  # counter: token rows computed (all layers)
M_WORKER_COMPUTE = "mesh.expert_worker.compute"  # counter, s: expert compute time
M_WORKER_BYTES = "mesh.expert_worker.bytes"  # counter, By, attribute direction=sent|received


def tracer() -> trace.Tracer:
    return trace.get_tracer(SCOPE)


def meter() -> metrics.Meter:
    return metrics.get_meter(SCOPE)


def remote_parent(trace_id: int, span_id: int):
    """A context whose parent is a span in another process (the step header's ids)."""
    if not trace_id or not span_id:
        return None
    sc = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(sc))


def layer_trace_every() -> int:
    """Per-layer spans on every Nth step (0: never, the default: they cost more than they tell)."""
    try:
        return max(0, int(os.environ.get("MESH_TRACE_LAYER_EVERY", "0")))
    except ValueError:
        return 0


_configured = False


class LinkedSampler(Sampler):
    """The configured sampler, except that a span linked to a sampled span is sampled too.

    Engine steps are roots of their own traces, linked to the requests they serve: under a ratio
    sampler a sampled request would otherwise find most of its steps (and their expert-worker
    children) dropped. Spans with a parent, and unlinked roots, keep the configured decision."""

    def __init__(self, delegate):
        self.delegate = delegate

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None):
        if links and not trace.get_current_span(parent_context).get_span_context().is_valid \
                and any(link.context.is_valid and link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self.delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"LinkedSampler{{{self.delegate.get_description()}}}"


_TRACE_EXPORTERS = ("otlp", "console", "none")
_METRIC_EXPORTERS = ("otlp", "console", "prometheus", "none")


def _exporters(variable: str, known: tuple[str, ...], default: list[str]) -> list[str]:
    """The exporters a comma-separated OTEL_*_EXPORTER names (`none` alone: none; unset: `default`)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = os.environ.get(variable)
    if raw is None or not raw.strip():
        return default
    names = list(dict.fromkeys(x.strip().lower() for x in raw.split(",") if x.strip()))
    unknown = [x for x in names if x not in known]
    if unknown:
        raise RuntimeError(f"{variable}={raw}: unknown exporter {unknown[0]!r} (known: {', '.join(known)})")
    return [x for x in names if x != "none"]


def trace_exporters() -> list[str]:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return _exporters("OTEL_TRACES_EXPORTER", _TRACE_EXPORTERS, ["otlp"] if endpoint else [])


def metric_exporters() -> list[str]:
    return _exporters("OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS, [])


def tracing_requested() -> bool:
    return bool(trace_exporters())


def metrics_export_requested() -> bool:
    """Metrics pushed over OTLP (OTEL_METRICS_EXPORTER includes otlp)."""
    return "otlp" in metric_exporters()


def setup(service_name: str, metrics_port: int | None = None, span_exporter=None, metric_reader=None) -> None:
    """Install the SDK once per process. Nothing requested: nothing installed (no-op API). Raises
    RuntimeError for an unknown exporter name or a missing exporter package."""
    global _configured
    if _configured:
        return
    from opentelemetry.sdk.resources import Resource
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    processors = []
    if span_exporter is not None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        processors.append(BatchSpanProcessor(span_exporter))  # OTEL_BSP_* apply
    for name in trace_exporters() if span_exporter is None else []:
        if name == "otlp":
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            processors.append(BatchSpanProcessor(_otlp_exporter()))
        else:  # console: each span printed as it ends, nothing left to flush (or wait for) at exit
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    if processors:
        from opentelemetry.sdk.trace import TracerProvider
        configured = TracerProvider(shutdown_on_exit=False).sampler  # from OTEL_TRACES_SAMPLER(_ARG)
        provider = TracerProvider(resource=resource, sampler=LinkedSampler(configured))
        for processor in processors:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
    readers = [metric_reader] if metric_reader is not None else []
    for name in metric_exporters():
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        if name == "otlp":
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter()))  # OTEL_METRIC_EXPORT_INTERVAL
        elif name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            readers.append(_prometheus(int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")),
                                       os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")))
    if metrics_port is not None:
        readers.append(_prometheus(metrics_port, "0.0.0.0"))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured = True


def shutdown() -> None:
    """Flush spans and metrics (at process exit)."""
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        fn = getattr(provider, "shutdown", None)
        if fn is not None:
            try:
                fn()
            except Exception as e:  # exporting must never break shutdown
                log.warning("telemetry shutdown: %s", e)


def _prometheus(port: int, host: str):
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server
    start_http_server(port, addr=host)
    return PrometheusMetricReader()


def _otlp_metric_exporter():
    return _otlp("metrics", "metric_exporter", "OTLPMetricExporter")


def _otlp_exporter():
    return _otlp("traces", "trace_exporter", "OTLPSpanExporter")


def _otlp(signal: str, module: str, cls: str):
    """The OTLP exporter of one signal, over gRPC or HTTP as OTEL_EXPORTER_OTLP_[SIGNAL_]PROTOCOL says
    (endpoint, headers and timeouts come from the standard variables, read by the exporter)."""
    import importlib

    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    packages = {"grpc": "opentelemetry.exporter.otlp.proto.grpc",
                "http/protobuf": "opentelemetry.exporter.otlp.proto.http"}
    if protocol not in packages:
        raise RuntimeError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported (grpc, http/protobuf)")
    try:
        return getattr(importlib.import_module(f"{packages[protocol]}.{module}"), cls)()
    except ImportError:
        raise RuntimeError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} needs the package "
                           f"{packages[protocol].replace('.', '-')}") from None
