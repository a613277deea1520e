"""A minimal OTLP/gRPC trace receiver: collects exported spans in memory.

For tests and benchmarks that need a real OTLP endpoint on loopback (what a Collector would be in
production): `with OtlpSink() as sink: os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint`.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
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


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: "OtlpSink"):
        self.sink = sink

    def Export(self, request, context):
        got = []
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        service=res.get("service.name", ""), name=s.name,
                        trace_id=int.from_bytes(s.trace_id, "big"), span_id=int.from_bytes(s.span_id, "big"),
                        parent_span_id=int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else 0,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano))
        with self.sink.lock:
            self.sink.spans.extend(got)
            self.sink.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink:
    def __init__(self, host: str = "127.0.0.1"):
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"
        self.server.start()

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def stop(self) -> None:
        self.server.stop(0)

    def __enter__(self) -> "OtlpSink":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
