"""A minimal OTLP/gRPC receiver: collects exported spans and metric points in memory.

For tests and benchmarks that need a real OTLP endpoint on loopback (what a Collector would be in
production): `with OtlpSink() as sink: os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint`.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int
    attributes: dict
    start_ns: int
    end_ns: int


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _items(resources, scopes: str, items: str):
    """(service.name, item) for every span or metric of an OTLP export request."""
    for r in resources:
        service = {a.key: _value(a.value) for a in r.resource.attributes}.get("service.name", "")
        for scope in getattr(r, scopes):
            for item in getattr(scope, items):
                yield service, item


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: "OtlpSink"):
        self.sink = sink

    def Export(self, request, context):
        got = [ReceivedSpan(service=service, name=s.name, trace_id=int.from_bytes(s.trace_id, "big"),
                            span_id=int.from_bytes(s.span_id, "big"),
                            parent_span_id=int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else 0,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano)
               for service, s in _items(request.resource_spans, "scope_spans", "spans")]
        with self.sink.lock:
            self.sink.spans.extend(got)
            self.sink.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class ReceivedPoint:
    service: str
    metric: str
    attributes: dict
    value: float  # a sum or gauge's value, a histogram's count


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: "OtlpSink"):
        self.sink = sink

    def Export(self, request, context):
        got = []
        for service, m in _items(request.resource_metrics, "scope_metrics", "metrics"):
            kind = m.WhichOneof("data")
            for p in getattr(m, kind).data_points:
                if kind == "histogram":
                    value = float(p.count)
                else:
                    value = float(p.as_double if p.WhichOneof("value") == "as_double" else p.as_int)
                got.append(ReceivedPoint(service=service, metric=m.name, value=value,
                                         attributes={a.key: _value(a.value) for a in p.attributes}))
        with self.sink.lock:
            self.sink.points.extend(got)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpSink:
    def __init__(self, host: str = "127.0.0.1"):
        self.spans: list[ReceivedSpan] = []
        self.points: list[ReceivedPoint] = []
        self.requests = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"
        self.server.start()

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def metric_points(self) -> list[ReceivedPoint]:
        with self.lock:
            return list(self.points)

    def stop(self) -> None:
        self.server.stop(0)

    def __enter__(self) -> "OtlpSink":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
