"""The OpenAI-compatible HTTP API of `mesh serve --http-port`: a Starlette app served by uvicorn in the
gateway's own event loop, beside grpc.aio.

  POST /v1/completions        text completions, `suffix` for fill-in-the-middle
  POST /v1/chat/completions   chat, the prompt rendered with the model's chat template
  GET  /v1/models             the served model
  GET  /health                200 while serving; 503 while loading, draining or after an engine failure

`"stream": true` answers as server-sent events (`data: {chunk}` lines, then `data: [DONE]`). Errors are
OpenAI's error object: 400 bad input, 401 bad credentials, 404 unknown model or path, 429 over the
admission limit, 503 loading / draining / engine lost (retry elsewhere), 500 anything else. Requests go
through the same admission (`Gateway.submit`), caller identity (`x-tenant-id`, router_service.auth),
tracing (a server span, child of a W3C `traceparent` header) and access log as gRPC calls; a client that
disconnects has its requests aborted and their KV blocks freed.

uvicorn runs embedded: the gateway binds the socket (so port 0 works and bind errors surface at
start), and `HttpServer` leaves signals to the gateway, which owns shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from typing import Any, AsyncIterator

import uvicorn
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh import telemetry
from mesh.types import InvalidRequest, RequestOutput, Usage
from router_service import openai_api as oa
from router_service.async_engine import EngineError, Overloaded
from router_service.auth import Unauthenticated, identify
from router_service.chat import ChatTemplate
from router_service.logs import AccessRecord
from router_service.server import Unavailable

log = logging.getLogger("mesh.serve")


def _error(e: oa.ApiError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, however it ends (a
    client that went away included), so that its finally block aborts the engine requests at once."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class OpenAIApp:
    def __init__(self, gateway):
        self.gw = gateway
        self._templates: dict[str, ChatTemplate | None] = {}
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    # ---- plain endpoints ------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        try:
            self.gw.available()
        except Unavailable as e:
            return _error(oa.ApiError(503, str(e)))
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        try:
            identify(request.headers, self.gw.tokens)
        except Unauthenticated as e:
            return _error(oa.ApiError(401, str(e)))
        try:
            aengine = self.gw.available()
        except Unavailable as e:
            return _error(oa.ApiError(503, str(e)))
        return JSONResponse({"object": "list", "data": [{
            "id": self.gw.model_name, "object": "model", "created": int(self.gw.started_at), "owned_by": "moe-mesh",
            "root": str(aengine.engine.model_dir), "max_model_len": aengine.engine.max_model_len}]})

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(oa.ApiError(exc.status_code, message))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(oa.ApiError(500, f"internal error: {type(exc).__name__}"))

    # ---- inference ------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    def _template(self, engine) -> ChatTemplate:
        key = str(engine.model_dir)
        if key not in self._templates:
            try:
                self._templates[key] = ChatTemplate.from_dir(engine.model_dir)
            except ValueError as e:
                raise oa.ApiError(400, str(e)) from None
        template = self._templates[key]
        if template is None or engine.tokenizer is None:
            raise oa.ApiError(400, f"the model {self.gw.model_name} has no chat template (tokenizer_config.json "
                                   "chat_template or chat_template.jinja): use /v1/completions")
        return template

    async def _serve(self, request: Request, chat: bool) -> Response:
        path = request.url.path
        rec = AccessRecord("http", f"POST {path}", status="200")
        parent = propagate.extract(dict(request.headers))
        span = telemetry.tracer().start_span(f"POST {path}", context=parent, kind=trace.SpanKind.SERVER, attributes={
            "http.request.method": "POST", "url.path": path, "url.scheme": request.url.scheme})
        trace_ctx = trace.set_span_in_context(span, parent)
        streaming = False
        submitted: list = []
        try:
            try:
                caller = identify(request.headers, self.gw.tokens)
            except Unauthenticated as e:
                raise oa.ApiError(401, str(e)) from None
            rec.tenant = caller.tenant
            try:
                body = json.loads(await _read_body(request))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise oa.ApiError(400, f"the request body is not valid JSON: {e}") from None
            if chat:
                api, messages = oa.parse_chat(body)
            else:
                api = oa.parse_completion(body)
            if api.model != self.gw.model_name:
                raise oa.ApiError(404, f"the model '{api.model}' does not exist here; this server serves "
                                       f"'{self.gw.model_name}' (GET /v1/models)", param="model",
                                  code="model_not_found")
            aengine = self._available()
            if chat:
                template = self._template(aengine.engine)
                prompt = await asyncio.to_thread(template.render, messages)
                api.prompts = [{"prompt": prompt}]
            for item in api.prompts:
                submitted.append(await self._submit(item, api, caller.cache_salt, trace_ctx))
            rid = ("chatcmpl-" if chat else "cmpl-") + submitted[0][1]
            rec.request_id = rid
            answer = _Answer(self.gw.model_name, rid, chat, api, oa.TokenText(aengine.engine.tokenizer), rec)
            streams = [s for _, _, s in submitted]
            if api.stream:
                streaming = True
                return _EventStream(self._events(answer, streams, submitted, span, rec))
            # A client that goes away before the answer is whole has its requests aborted (finally below).
            collect = asyncio.ensure_future(_collect(answer, streams))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not collect.done():
                    collect.cancel()
            if collect.cancelled():
                rec.status = "499"  # the client went away (nginx's code for it); nobody reads this
                return Response(status_code=499)
            try:
                collect.result()
            except EngineError as e:
                await self.gw.engine_lost()
                raise oa.ApiError(503, f"{e}; retry on another gateway") from None
            submitted = []  # all finished
            return JSONResponse(answer.whole())
        except InvalidRequest as e:  # the chat template refused the messages
            rec.status = "400"
            span.set_attribute("http.response.status_code", 400)
            return _error(oa.ApiError(400, str(e)))
        except oa.ApiError as e:
            rec.status = str(e.status)
            span.set_attribute("http.response.status_code", e.status)
            if e.status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, e.message))
            return _error(e)
        finally:
            if not streaming:
                for aengine, engine_id, _ in submitted:  # failed half way, or the client went away
                    aengine.abort(engine_id)
                span.set_attribute("http.response.status_code", int(rec.status))
                span.end()
                rec.emit()

    def _available(self):
        try:
            return self.gw.available()
        except Unavailable as e:
            raise oa.ApiError(503, str(e)) from None

    async def _submit(self, item: dict, api: oa.ApiRequest, salt: str, trace_ctx):
        try:
            return await self.gw.submit(lambda engine, engine_id: oa.build_request(
                item, api.sampling, engine, engine_id, salt, trace_ctx, api.max_tokens_field))
        except InvalidRequest as e:
            raise oa.ApiError(400, str(e)) from None
        except Overloaded as e:
            raise oa.ApiError(429, str(e)) from None
        except EngineError as e:
            await self.gw.engine_lost()
            raise oa.ApiError(503, f"{e}; retry on another gateway") from None
        except Unavailable as e:
            raise oa.ApiError(503, str(e)) from None

    async def _events(self, answer: "_Answer", streams, submitted, span, rec: AccessRecord) -> AsyncIterator[bytes]:
        done = False
        try:
            for chunk in answer.opening():
                yield _sse(chunk)
            async for i, out in _merge(streams):
                chunk = answer.add(i, out)
                if chunk is not None:
                    yield _sse(chunk)
            if answer.api.include_usage:
                yield _sse(answer.usage_chunk())
            yield b"data: [DONE]\n\n"
            done = True
        except EngineError as e:
            # the status line is out: the stream ends with an error event instead
            await self.gw.engine_lost()
            rec.status = "503"
            yield _sse(oa.ApiError(503, f"{e}; retry on another gateway").body())
        finally:
            if not done:
                if rec.status == "200":
                    rec.status = "499"  # the client went away (nginx's code for it)
                for aengine, engine_id, _ in submitted:
                    aengine.abort(engine_id)
            span.set_attribute("http.response.status_code", 200)
            span.end()
            rec.emit()


async def _read_body(request: Request, limit: int | None = None) -> bytes:
    """The request body, refused with 413 past `limit` bytes (the gRPC port's message limit) before
    it is all in memory."""
    from router_service.server import MAX_MESSAGE_BYTES
    limit = MAX_MESSAGE_BYTES if limit is None else limit
    declared = request.headers.get("content-length")
    too_big = oa.ApiError(413, f"the request body is over {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _collect(answer: "_Answer", streams: list) -> None:
    async for i, out in _merge(streams):
        answer.add(i, out)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merge(streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come; one stream is read directly."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Answer:
    """Accumulates one API call's outputs; shapes them as stream chunks or as the whole response."""

    def __init__(self, model: str, rid: str, chat: bool, api: oa.ApiRequest, text: oa.TokenText, rec: AccessRecord):
        self.model, self.id, self.chat, self.api, self.text, self.rec = model, rid, chat, api, text, rec
        self.created = int(time.time())
        n = api.sampling.n
        self.count = len(api.prompts) * n
        self.texts = [[] for _ in range(self.count)]
        self.ids = [[] for _ in range(self.count)]
        self.logprobs = [[] for _ in range(self.count)]
        self.offsets = [0] * self.count
        self.reasons: list[str | None] = [None] * self.count
        self.usages = {}

    def _index(self, prompt: int, out: RequestOutput) -> int:
        return prompt * self.api.sampling.n + out.index

    def add(self, prompt: int, out: RequestOutput) -> dict | None:
        """Record an output; returns its stream chunk (None when it carries nothing to tell)."""
        i = self._index(prompt, out)
        self.usages[prompt] = out.usage
        if out.new_token_ids:
            self.rec.token()
        self.texts[i].append(out.new_text)
        self.ids[i] += out.new_token_ids
        if out.logprobs:
            self.logprobs[i] += out.logprobs
        if out.finished:
            self.reasons[i] = oa.finish_reason(out.finish_reason)
            self.rec.finish_reasons.append(self.reasons[i])
        self.rec.usage = self.total_usage()
        if not (out.new_text or out.finished or out.logprobs or (self.api.return_token_ids and out.new_token_ids)):
            return None  # a token whose text is held back (a split character, a possible stop string)
        choice: dict[str, Any] = {"index": i}
        lps = None
        if self.api.top_logprobs is not None and out.logprobs is not None:
            if self.chat:
                lps = oa.chat_logprobs(out.logprobs, self.text)
            else:
                lps, self.offsets[i] = oa.completion_logprobs(out.logprobs, self.text, self.offsets[i])
        if self.chat:
            choice["delta"] = {"content": out.new_text} if out.new_text else {}
        else:
            choice["text"] = out.new_text
        choice["logprobs"] = lps
        choice["finish_reason"] = oa.finish_reason(out.finish_reason) if out.finished else None
        if self.api.return_token_ids:
            choice["token_ids"] = out.new_token_ids
        return self._chunk([choice])

    def _chunk(self, choices: list) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    def opening(self) -> list[dict]:
        """Chat streams open each choice with the assistant role."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(self.count)]

    def total_usage(self) -> Usage:
        u = Usage()
        for v in self.usages.values():
            u.prompt_tokens += v.prompt_tokens
            u.completion_tokens += v.completion_tokens
            u.cached_tokens += v.cached_tokens
        return u

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": oa.usage_json(self.total_usage())}

    def whole(self) -> dict:
        choices = []
        for i in range(self.count):
            text = "".join(self.texts[i])
            lps = None
            if self.api.top_logprobs is not None:
                lps = (oa.chat_logprobs(self.logprobs[i], self.text) if self.chat
                       else oa.completion_logprobs(self.logprobs[i], self.text, 0)[0])
            c: dict[str, Any] = {"index": i}
            if self.chat:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            c["logprobs"] = lps
            c["finish_reason"] = self.reasons[i]
            if self.api.return_token_ids:
                c["token_ids"] = self.ids[i]
            choices.append(c)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": oa.usage_json(self.total_usage())}


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway owns SIGTERM/SIGINT and stops us itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, gateway, host: str, port: int):
        self.gw, self.host, self.port = gateway, host, port
        self.server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> None:
        """Bind and start serving; raises RuntimeError naming the address if the port cannot be had."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto IPPROTO_TCP, not 0 (socket.create_server's): asyncio turns Nagle's algorithm off only on
        # connections whose socket says TCP, and with it on, every response on a kept-alive connection
        # waited ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
        except OSError as e:
            sock.close()
            raise RuntimeError(f"cannot listen for HTTP on {self.host}:{self.port}: {e}") from None
        self._sock = sock
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(OpenAIApp(self.gw).app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, server_header=False,
                                **(self.gw.tls.uvicorn_options() if getattr(self.gw, "tls", None) else {}))
        # uvicorn's own start/stop lines repeat the gateway's; its warnings and errors still show
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self.server.serve(sockets=[self._sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self, timeout: float = 1.0) -> None:
        if self.server is None or self._task is None:
            return
        self.server.config.timeout_graceful_shutdown = max(0.1, timeout)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout + 2.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down regardless
            self.server.force_exit = True
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
