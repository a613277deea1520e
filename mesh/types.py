"""Pure data passed between the layers of moe-mesh. Imports nothing local."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """The caller sent something the engine cannot serve; the message says what and how to fix it."""


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1) or math.isnan(self.top_p):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InvalidRequest(f"seed must be in [0, 2^64), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None  # the text the ids came from, if any
    cache_salt: str = ""  # tenant or opt-out salt for prefix hashing
    use_prefix_cache: bool = True
    arrival_time: float = 0.0
    trace_context: object | None = None  # the caller's tracing context (an OpenTelemetry Context)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new tokens and text since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)


@dataclass
class CompletionResult:
    """A whole request's result, as `mesh generate --json` prints it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage

    def as_dict(self) -> dict:
        return {"request_id": self.request_id, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason.value, "usage": self.usage.as_dict()}
