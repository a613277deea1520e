"""proto <-> mesh.types, in one place (the only module that knows both shapes).

Proto3 cannot tell an unset scalar from zero, so the sampling fields whose zero means something
(max_tokens, temperature, top_p, top_k, seed, n, logprobs, the penalties, min_tokens) are `optional`
in the proto and read with HasField: unset takes the default that SamplingParams (and every other
front end) has, an explicit 0 is passed on and validated.
"""

from __future__ import annotations

from typing import Any

from mesh.config import ARCHITECTURES
from mesh.types import (FinishReason, InvalidRequest, Request, RequestOutput, SamplingParams, TokenLogprob,
                        Usage, check_context)
from router_service.protos import inference_pb2 as pb

MAX_REQUEST_ID_CHARS = 256
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "logprobs", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "min_tokens")

_FINISH_TO_PB = {None: pb.FINISH_REASON_UNSPECIFIED, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
                 FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.ABORT: pb.FINISH_REASON_ABORT}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def sampling_from_pb(msg: pb.GenerateRequest) -> SamplingParams:
    """Raises InvalidRequest with SamplingParams' own message for out-of-range values."""
    s = msg.sampling
    kw: dict[str, Any] = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING if s.HasField(name)}
    return SamplingParams(stop=tuple(s.stop), stop_token_ids=tuple(msg.stop_token_ids),
                          ignore_eos=s.ignore_eos, **kw)


def request_from_pb(msg: pb.GenerateRequest, engine: Any, request_id: str, tenant: str = "",
                    trace_context: Any = None) -> Request:
    """Build the engine request (tokenizing text or FIM). Raises InvalidRequest.

    Reads only the engine's tokenizer and immutable config (make_request does not touch engine
    state), so it may run off the engine thread."""
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id: {len(msg.request_id)} characters; at most {MAX_REQUEST_ID_CHARS} "
                             "are accepted (it is echoed in every response)")
    req = _request_from_pb(msg, engine, request_id, tenant, trace_context)
    if msg.sampling.HasField("max_tokens"):
        check_context(len(req.prompt_token_ids), req.sampling.max_tokens, engine.max_model_len,
                      "sampling.max_tokens")
    return req


def _request_from_pb(msg: pb.GenerateRequest, engine: Any, request_id: str, tenant: str = "",
                     trace_context: Any = None) -> Request:
    sources = [name for name, given in (("prompt", bool(msg.prompt)),
                                        ("prompt_token_ids", len(msg.prompt_token_ids) > 0),
                                        ("fim", msg.HasField("fim"))) if given]
    if not sources:
        raise InvalidRequest("the prompt is empty: set prompt, prompt_token_ids or fim")
    if len(sources) > 1:
        raise InvalidRequest(f"give exactly one prompt source, got {' and '.join(sources)}")
    sampling = sampling_from_pb(msg)
    tok = engine.tokenizer
    if sampling.stop and tok is None:
        raise InvalidRequest("stop strings need the model's tokenizer, and this model has none: "
                             "use stop_token_ids instead")
    # The tenant salts the prefix-cache hashes: no tenant can hit, or time, another's cached prefix.
    kw = dict(sampling=sampling, request_id=request_id, use_prefix_cache=not msg.disable_prefix_cache,
              cache_salt=f"tenant:{tenant}" if tenant else "", trace_context=trace_context,
              resume_token_ids=list(msg.resume_token_ids))
    if msg.HasField("fim"):
        if tok is None:
            raise InvalidRequest("fill-in-the-middle needs the model's tokenizer, and this model has none")
        try:
            ids = tok.fim_prompt(msg.fim.prefix, msg.fim.suffix)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return engine.make_request(prompt_token_ids=ids, **kw)
    if msg.prompt:
        return engine.make_request(prompt=msg.prompt, **kw)
    return engine.make_request(prompt_token_ids=list(msg.prompt_token_ids), **kw)


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens)


def usage_from_pb(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def logprobs_to_pb(lps: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps or ()]


def logprobs_from_pb(msgs) -> list[TokenLogprob]:
    return [TokenLogprob(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top]) for m in msgs]


def output_to_pb(out: RequestOutput, request_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=request_id, token_ids=out.new_token_ids, text=out.new_text,
                               finish_reason=_FINISH_TO_PB[out.finish_reason], usage=usage_to_pb(out.usage),
                               index=out.index, logprobs=logprobs_to_pb(out.logprobs))


def output_from_pb(msg: pb.GenerateResponse) -> RequestOutput:
    reason = _FINISH_FROM_PB.get(msg.finish_reason)
    return RequestOutput(msg.request_id, list(msg.token_ids), msg.text, reason is not None, reason,
                         usage_from_pb(msg.usage), msg.index,
                         logprobs_from_pb(msg.logprobs) if len(msg.logprobs) else None)


def completion_to_pb(index: int, token_ids: list[int], text: str, reason: FinishReason | None,
                     logprobs: list[TokenLogprob] | None) -> pb.Completion:
    return pb.Completion(index=index, token_ids=token_ids, text=text, finish_reason=_FINISH_TO_PB[reason],
                         logprobs=logprobs_to_pb(logprobs))


def finish_reason_name(value: int) -> str | None:
    reason = _FINISH_FROM_PB.get(value)
    return None if reason is None else reason.value


def model_info(engine: Any, num_workers: int, max_queued: int) -> pb.ModelInfo:
    mc, cfg = engine.model_config, engine.config
    arch = {family: name for name, family in ARCHITECTURES.items()}.get(mc.family, "")
    return pb.ModelInfo(
        architecture=arch, family=mc.family, vocab_size=mc.vocab_size, num_layers=mc.num_layers,
        num_experts=mc.num_experts, top_k=mc.top_k, max_model_len=engine.max_model_len, dtype=cfg.dtype,
        block_size=cfg.block_size, num_expert_workers=num_workers, model=str(engine.model_dir),
        has_tokenizer=engine.tokenizer is not None, num_kv_blocks=engine.blocks.num_blocks,
        hidden_size=mc.hidden_size, shared_expert_intermediate_size=mc.shared_expert_intermediate_size,
        max_queued_requests=max_queued, device=cfg.device)
