"""Pure data passed between the layers of moe-mesh. Imports nothing local."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """The caller sent something the engine cannot serve; the message says what and how to fix it."""


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int, field: str = "max_tokens") -> None:
    """A request that asks for more tokens than the context can hold is refused (as vLLM does) rather
    than run until the context is full: InvalidRequest naming the field and the numbers."""
    if prompt_tokens + max_tokens > max_model_len:
        room = max_model_len - prompt_tokens
        raise InvalidRequest(
            f"{field}: this model's context holds {max_model_len} tokens, but the request asks for "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} to generate); "
            + (f"set {field} to at most {room}" if room > 0 else "shorten the prompt")
            + (" or shorten the prompt" if room > 0 else ""))


# The defaults of every front end (the CLI, gRPC and HTTP): a request that names none of these gets
# the same completion whichever way it came. Greedy, because code completion wants the likeliest code.
DEFAULT_MAX_TOKENS = 64
DEFAULT_TEMPERATURE = 0.0
MAX_N = 16  # completions per request
MAX_LOGPROBS = 20  # top alternatives reported per token


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    Penalties follow OpenAI's and transformers' definitions, applied to the logits before temperature,
    top-k and top-p: `presence_penalty` is subtracted once from every token already in the output,
    `frequency_penalty` once per occurrence in the output; `repetition_penalty` (transformers' and
    the CTRL paper's) divides positive and multiplies negative logits of every token seen in the
    prompt or the output. `min_tokens`: end-of-sequence and stop token ids cannot be sampled before
    that many tokens are out. `logprobs`: None reports none; k >= 0 reports each sampled token's log
    probability and the k likeliest alternatives', from the log-softmax of the logits after penalties
    and the min_tokens mask, before temperature, top-k and top-p. `n`: independent completions of
    the prompt, which is computed once and shared."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0

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
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequest(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether the logits change before sampling (penalties, min_tokens): else the plain path runs."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.min_tokens > 0)


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
    # Output tokens this request already produced and sent (a stream resumed after its gateway was
    # lost): they follow the prompt, count toward max_tokens, min_tokens and the penalties, and are not
    # sent again; a seeded request's generator skips their draws, so the continuation is the one the
    # lost stream would have produced. n must be 1.
    resume_token_ids: list[int] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}


@dataclass
class TokenLogprob:
    """A sampled token's log probability and the `logprobs` likeliest tokens' (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one completion of a request: the new tokens and text since
    the last output. `index` tells the request's n completions apart; `finished` is this completion's.
    `usage` counts the prompt once and the tokens of all the request's completions."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    index: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them


@dataclass
class CompletionResult:
    """A whole request's result, as `mesh generate --json` prints it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    index: int = 0
    logprobs: list[TokenLogprob] | None = None

    def as_dict(self) -> dict:
        out = {"request_id": self.request_id, "index": self.index, "token_ids": self.token_ids,
               "text": self.text, "finish_reason": self.finish_reason.value, "usage": self.usage.as_dict()}
        if self.logprobs is not None:
            out["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                                "top": [[t, v] for t, v in lp.top]} for lp in self.logprobs]
        return out
