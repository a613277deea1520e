"""OpenAI-compatible JSON <-> mesh.types, in one place: request bodies of `/v1/completions` and
`/v1/chat/completions` to engine requests, engine outputs to response objects and stream chunks.

Fields read: model, prompt (a string, strings, token ids or lists of token ids) and suffix
(fill-in-the-middle) or messages, max_tokens (chat: also max_completion_tokens), temperature, top_p,
n, seed, stop, presence_penalty, frequency_penalty, logprobs (completions: the number of alternatives;
chat: a boolean, with top_logprobs), stream and stream_options.include_usage; and, as vLLM accepts
them, top_k, min_tokens, repetition_penalty, ignore_eos, stop_token_ids and return_token_ids (the
choice then carries the generated `token_ids`). Unset fields take the defaults every front end shares
(mesh.types: 64 tokens, greedy). `user` is accepted and ignored; fields that would change the output
in ways this server does not implement (echo, best_of > n, logit_bias, tools, response formats other
than text, non-text message parts) are refused with 400 rather than ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mesh.types import FinishReason, InvalidRequest, Request, SamplingParams, TokenLogprob, Usage, check_context


class ApiError(Exception):
    """An error the API answers with `status` and OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param)


def _number(body: dict, name: str, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise _bad(name, f"expected a finite number, got {value!r}")
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {value!r}")
    return value


def _string_list(body: dict, name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _bad(name, f"expected a string or a list of strings, got {value!r}")


def _refuse(body: dict, name: str, allowed: Callable[[Any], bool], why: str) -> None:
    if name in body and body[name] is not None and not allowed(body[name]):
        raise _bad(name, why)


@dataclass
class ApiRequest:
    """A parsed request: what to submit (one engine request per prompt) and how to answer."""

    model: str
    sampling: SamplingParams
    prompts: list[dict] = field(default_factory=list)  # each: {"prompt": str} | {"prompt_token_ids": [...]} | {"fim": (prefix, suffix)}
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    top_logprobs: int | None = None  # what the response reports (chat: top_logprobs when logprobs is true)
    max_tokens_field: str | None = None  # the field that set max_tokens (None: the default, clamped to the context)


def _given(body: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if body.get(n) is not None), None)


def _sampling(body: dict, max_tokens_names: tuple[str, ...], logprobs: int | None) -> SamplingParams:
    kw: dict[str, Any] = {}
    for name in max_tokens_names:
        value = _number(body, name, integer=True)
        if value is not None:
            kw["max_tokens"] = value
            break
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            kw[name] = float(value)
    for name in ("n", "seed", "top_k", "min_tokens"):
        value = _number(body, name, integer=True)
        if value is not None:
            kw[name] = value
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and all(isinstance(t, int) for t in stop_ids)):
        raise _bad("stop_token_ids", f"expected a list of token ids, got {stop_ids!r}")
    try:
        return SamplingParams(stop=_string_list(body, "stop"), stop_token_ids=tuple(stop_ids or ()),
                              ignore_eos=_bool(body, "ignore_eos"), logprobs=logprobs, **kw)
    except InvalidRequest as e:
        raise ApiError(400, str(e)) from None


def _common(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: the model id that GET /v1/models lists")
    _refuse(body, "logit_bias", lambda v: v == {}, "logit_bias is not supported")
    _refuse(body, "stream_options", lambda v: isinstance(v, dict), "expected an object")
    return body


def parse_completion(body: Any) -> ApiRequest:
    body = _common(body)
    _refuse(body, "echo", lambda v: v is False, "echo is not supported")
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    _refuse(body, "best_of", lambda v: v == n, "best_of other than n is not supported")
    logprobs = _number(body, "logprobs", integer=True)
    sampling = _sampling(body, ("max_tokens",), logprobs)
    prompt = body.get("prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad("suffix", f"expected a string, got {suffix!r}")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise _bad("prompt", "expected a non-empty string, list of strings, list of token ids or list of lists "
                             "of token ids")
    if suffix is not None and not all(isinstance(p, str) for p in prompts):
        raise _bad("suffix", "fill-in-the-middle needs text prompts")
    if suffix is not None:
        items = [{"fim": (p, suffix)} for p in prompts]
    else:
        items = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    if any(it.get("prompt") == "" for it in items):
        raise _bad("prompt", "the prompt is empty")
    return ApiRequest(body["model"], sampling, items, _bool(body, "stream"),
                      bool((body.get("stream_options") or {}).get("include_usage")), _bool(body, "return_token_ids"),
                      logprobs, _given(body, ("max_tokens",)))


def chat_messages(body: dict) -> list[dict]:
    """The messages with string contents (text parts joined), for the chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", f"message {i} needs a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad("messages", f"message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad("messages", f"message {i}: content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def parse_chat(body: Any) -> tuple[ApiRequest, list[dict]]:
    body = _common(body)
    _refuse(body, "tools", lambda v: v == [], "tools are not supported")
    _refuse(body, "tool_choice", lambda v: v == "none", "tool_choice is not supported")
    _refuse(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
            "only the text response format is supported")
    top = _number(body, "top_logprobs", integer=True)
    want = _bool(body, "logprobs")
    if top is not None and not want:
        raise _bad("top_logprobs", "needs logprobs: true")
    logprobs = (top or 0) if want else None
    sampling = _sampling(body, ("max_completion_tokens", "max_tokens"), logprobs)
    messages = chat_messages(body)
    return ApiRequest(body["model"], sampling, [], _bool(body, "stream"),
                      bool((body.get("stream_options") or {}).get("include_usage")),
                      _bool(body, "return_token_ids"), logprobs,
                      _given(body, ("max_completion_tokens", "max_tokens"))), messages


def build_request(item: dict, sampling: SamplingParams, engine: Any, engine_id: str, cache_salt: str,
                  trace_context: Any, max_tokens_field: str | None = None) -> Request:
    """One prompt of an ApiRequest as an engine request (tokenizing: runs off the event loop).
    `max_tokens_field`: the body field that set max_tokens; then prompt + max_tokens must fit the
    context (as vLLM checks), else InvalidRequest. Unset, the default is cut short by the context."""
    req = _build_request(item, sampling, engine, engine_id, cache_salt, trace_context)
    if max_tokens_field is not None:
        check_context(len(req.prompt_token_ids), sampling.max_tokens, engine.max_model_len, max_tokens_field)
    return req


def _build_request(item: dict, sampling: SamplingParams, engine: Any, engine_id: str, cache_salt: str,
                   trace_context: Any) -> Request:
    kw = dict(sampling=sampling, request_id=engine_id, cache_salt=cache_salt, trace_context=trace_context)
    tok = engine.tokenizer
    if (sampling.stop or "prompt" in item or "fim" in item) and tok is None:
        raise InvalidRequest(f"{engine.model_dir.name} has no tokenizer.json: send token ids as the prompt "
                             "(and stop_token_ids instead of stop strings)")
    if "fim" in item:
        try:
            ids = tok.fim_prompt(*item["fim"])
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return engine.make_request(prompt_token_ids=ids, **kw)
    if "prompt" in item:
        return engine.make_request(prompt=item["prompt"], **kw)
    return engine.make_request(prompt_token_ids=item["prompt_token_ids"], **kw)


# ---- responses ---------------------------------------------------------------------------------
def finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class TokenText:
    """Token ids as the strings logprobs report (special tokens included; `token_id:N` without a
    tokenizer)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tok is None:
            return f"token_id:{token_id}"
        return self.tok.decode([token_id], skip_special_tokens=False)


def completion_logprobs(lps: list[TokenLogprob], text: TokenText, offset: int) -> tuple[dict, int]:
    """The completions API's logprobs object for these tokens, their text offsets starting at
    `offset`; and the offset after them."""
    tokens, offsets = [], []
    for lp in lps:
        s = text(lp.token_id)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [_by_text(lp.top, text) for lp in lps], "text_offset": offsets}, offset


def _by_text(top: list[tuple[int, float]], text: TokenText) -> dict[str, float]:
    """{token text: logprob}, OpenAI's shape; tokens with the same text (byte pieces that each decode
    to U+FFFD) keep the likeliest's."""
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(text(t), v)
    return out


def chat_logprobs(lps: list[TokenLogprob], text: TokenText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        s = text(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}
