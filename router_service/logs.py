"""Logging for `mesh serve`: the text or JSON line format, and the access log.

The access log (logger `mesh.access`) has one INFO line per inference request, whichever protocol it
came by: request id, tenant, protocol and method, status, prompt / cached / completion tokens, time to
first token, duration and finish reason. With `--log-format json` every log line is one JSON object
(`time`, `level`, `logger`, `message`, plus an access line's fields), for log pipelines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field

from mesh.types import Usage

ACCESS = logging.getLogger("mesh.access")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger for the server process (replacing earlier handlers)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        logging.Formatter.converter = time.gmtime
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


@dataclass
class AccessRecord:
    """One request's line in the access log, filled in as the request goes."""

    protocol: str  # grpc | http
    method: str  # mesh.v1.Inference/Generate, POST /v1/completions, ...
    tenant: str = ""
    request_id: str = ""
    status: str = "OK"  # the gRPC code name, or the HTTP status
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reasons: list[str] = field(default_factory=list)

    def token(self) -> None:
        """A response carrying tokens went out."""
        if self.first_token is None:
            self.first_token = time.monotonic()

    def emit(self) -> None:
        now = time.monotonic()
        fields = {
            "request_id": self.request_id, "tenant": self.tenant, "protocol": self.protocol, "method": self.method,
            "status": self.status, "prompt_tokens": self.usage.prompt_tokens,
            "cached_tokens": self.usage.cached_tokens, "completion_tokens": self.usage.completion_tokens,
            "ttft_ms": None if self.first_token is None else round((self.first_token - self.started) * 1e3, 2),
            "duration_ms": round((now - self.started) * 1e3, 2),
            "finish_reason": ",".join(self.finish_reasons) or None,
        }
        text = " ".join(f"{k}={'-' if v is None or v == '' else v}" for k, v in fields.items())
        ACCESS.info("access %s", text, extra={"fields": fields})
