"""The gateway (gRPC and the OpenAI-compatible HTTP API): the edge between callers and the mesh engine
(see docs/architecture.md).

The defaults live here, not in server.py, so that building the `mesh` CLI parser does not import
grpc or generate the proto stubs.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_GRACE = 10.0  # seconds in-flight requests get to finish on shutdown
DEFAULT_MAX_QUEUED = 256  # requests admitted at once (running + waiting)
