"""The gateway: `mesh.v1.Inference`, `grpc.health.v1.Health` and server reflection on grpc.aio and,
with an HTTP port, the OpenAI-compatible API (router_service.http_api) on uvicorn in the same event
loop. Both protocols admit requests through `Gateway.submit` and identify callers through
router_service.auth, so they share admission, tenants, the prefix cache, tracing and metrics.

Lifecycle of a `Gateway`:
  start()  bind the ports and answer health checks at once (NOT_SERVING), so orchestrators can probe
           while the model loads.
  load()   build the engine (in a daemon thread: loading weights or joining expert workers takes
           seconds to minutes and must not block the event loop, nor hold up exit), then wait for
           `ready()` (all expert workers loaded and joined), then report SERVING.
  stop()   drain: NOT_SERVING, new calls get UNAVAILABLE, in-flight streams get `grace` seconds to
           finish; the rest are aborted (their streams end with FINISH_REASON_ABORT), the engine
           thread stops, then `on_shutdown()` runs (the expert pool stops its workers there).
A request whose caller goes away (cancel, deadline) is aborted in the engine at once, so its KV
blocks come back before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Awaitable, Callable

import grpc
from opentelemetry import propagate, trace
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from google.protobuf.message import DecodeError

from mesh import telemetry
from mesh.engine.stats import EngineStats
from mesh.types import InvalidRequest, Request
from router_service import DEFAULT_GRACE, DEFAULT_HOST, DEFAULT_MAX_QUEUED, DEFAULT_PORT, convert
from router_service.async_engine import AsyncEngine, EngineError, Overloaded
from router_service.auth import Caller, PermissionDenied, TokenTable, Unauthenticated, identify, require_role
from router_service.logs import AccessRecord
from router_service.protos import inference_pb2 as pb
from router_service.protos import inference_pb2_grpc as pb_grpc
from router_service.tls import TlsFiles

log = logging.getLogger("mesh.serve")

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "mesh.v1.Inference"
MAX_MESSAGE_BYTES = 64 << 20
POST_GRACE_BUDGET = 6.0  # seconds for server stop, engine thread and on_shutdown together
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

EngineFactory = Callable[[], Any]
Hook = Callable[[], Any] | None  # sync or async


async def _call(hook: Callable[[], Any]) -> Any:
    result = hook()
    return await result if inspect.isawaitable(result) else result


class Unavailable(Exception):
    """The gateway cannot take requests now (loading, draining, or its engine failed): retry, maybe
    on another gateway. gRPC answers UNAVAILABLE, HTTP 503."""


class Gateway:
    def __init__(self, engine_factory: EngineFactory, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 *, ready: Hook = None, on_shutdown: Hook = None, max_queued: int = DEFAULT_MAX_QUEUED,
                 grace: float = DEFAULT_GRACE, num_workers: int = 0, http_port: int | None = None,
                 model_name: str = "", admin_token: str | None = None, expert_pool: Any = None,
                 tokens: TokenTable | None = None, tls: TlsFiles | None = None):
        """`tokens`: require bearer tokens (router_service.auth; None: the ports are open).
        `tls`: serve gRPC (and HTTP) over TLS, mutual TLS when it has a client CA.
        `expert_pool`: the expert_workers.pool.ExpertPool behind the engine's dispatcher (None: the
        experts run in the gateway), for the Admin API and placement switches.
        `http_port`: also serve the OpenAI-compatible HTTP API there (0: a free port; None: no HTTP).
        `model_name`: the model id the HTTP API lists and expects (default: the model directory's name).
        `admin_token`: the token mesh.v1.Admin calls must carry (None: every Admin call is refused)."""
        self.admin_token, self.expert_pool = admin_token, expert_pool
        self.engine_factory, self.host, self.port = engine_factory, host, port
        self.http_port, self.model_name = http_port, model_name
        self.tokens, self.tls = tokens, tls
        self.http = None  # router_service.http_api.HttpServer once started
        self.started_at = time.time()
        self.ready, self.on_shutdown = ready, on_shutdown
        self.max_queued, self.grace, self.num_workers = max_queued, grace, num_workers
        self.engine: Any = None
        self.aengine: AsyncEngine | None = None
        self.health = health.aio.HealthServicer()
        self.serving = False
        self.draining = False
        self._hurry = asyncio.Event()  # a second signal: skip what is left of the grace period
        self._stopped = asyncio.Event()
        self._stopping = False
        self.stop_requested = asyncio.Event()  # a signal, or the engine's death: `serve` stops
        self.failed = False  # the engine died (an expert worker lost, ...): exit with code 1
        self.stop_signalled = False  # SIGTERM/SIGINT received (set by `serve`)
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        # No SO_REUSEPORT: a second server on a port in use must fail, not silently share it.
        # Long code prompts (a whole repository as context) exceed gRPC's 4 MiB default.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        # Registered through `_add_service` rather than the generated helpers: a request whose bytes
        # do not parse gets INVALID_ARGUMENT (grpc itself answers UNKNOWN and logs a traceback), and
        # the Inference and Admin calls check credentials first. Health stays open for orchestrators' probes.
        from router_service.admin import SERVICE as ADMIN_SERVICE
        from router_service.admin import AdminServicer
        from router_service.protos import admin_pb2
        _add_service(server, pb.DESCRIPTOR.services_by_name["Inference"], InferenceServicer(self), pb, self)
        _add_service(server, admin_pb2.DESCRIPTOR.services_by_name["Admin"], AdminServicer(self, self.admin_token),
                     admin_pb2, self)
        _add_service(server, health_pb2.DESCRIPTOR.services_by_name["Health"], self.health, health_pb2, None)
        reflection.enable_server_reflection(
            [SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        address = f"{self.host}:{self.port}"
        if self.tls is not None:
            self.port = server.add_secure_port(address, self.tls.server_credentials())
        else:
            self.port = server.add_insecure_port(address)  # port 0: the OS picks one
        await self._set_health(NOT_SERVING)
        await server.start()
        self.server = server
        if self.http_port is not None:
            from router_service.http_api import HttpServer
            try:
                self.http = HttpServer(self, self.host, self.http_port)
                await self.http.start()
            except BaseException:
                await server.stop(0)
                raise
            self.http_port = self.http.port

    async def load(self) -> None:
        self.engine = await _in_daemon_thread(self.engine_factory)
        self.num_workers = self.engine.stats().pool.num_workers
        loop = asyncio.get_running_loop()
        self.aengine = AsyncEngine(self.engine, self.max_queued,
                                   on_failure=lambda e: loop.call_soon_threadsafe(self._engine_failed, e))
        pool = self.expert_pool
        if pool is not None:  # placement switches reach an idle engine through its thread
            aengine = self.aengine
            pool.wake = lambda: aengine.call_between_steps(pool.dispatcher.apply_pending)
            if pool.policy is not None:
                pool.policy.signals = _pressure_signals(self.engine)
        mc = self.engine.model_config
        self.model_name = self.model_name or self.engine.model_dir.name
        http = f" | HTTP (OpenAI API) on {self.host}:{self.http_port}" if self.http is not None else ""
        log.info("mesh serve: %s; %s", self.tls.describe() if self.tls is not None else
                 "NO TLS: traffic on these ports is plain text (--tls-cert/--tls-key to encrypt)",
                 f"bearer tokens required ({len(self.tokens)} tokens from {self.tokens.source})"
                 if self.tokens is not None else "NO AUTHENTICATION: anyone who reaches these ports may call "
                 "them and name any tenant (--auth-tokens-file to require tokens)")
        log.info("mesh serve: listening on %s:%d%s | model %s %s (%s) | %s %s | %d expert workers | "
                 "max %d queued requests", self.host, self.port, http, self.model_name, mc.family,
                 self.engine.model_dir, self.engine.config.device, self.engine.config.dtype, self.num_workers,
                 self.max_queued)
        while self.ready is not None and not await _call(self.ready):
            await asyncio.sleep(0.5)
        self.serving = True
        await self._set_health(SERVING)
        log.info("mesh serve: ready")

    def _engine_failed(self, error: BaseException) -> None:
        """The engine thread died. A gateway cannot repair its collective group in place: report
        NOT_SERVING and let `serve` stop with exit code 1, for the supervisor to restart it."""
        if self.failed:
            return
        if self.draining or self.stop_signalled:  # stopping anyway: requests in flight got UNAVAILABLE
            log.warning("mesh serve: expert workers gone while draining; stopping now")
            self.serving = False
            self._hurry.set()
            return
        log.error("mesh serve: %s; stopping (exit code 1) so that a supervisor restarts this gateway", error)
        self.serving, self.failed = False, True
        self.stop_requested.set()
        asyncio.ensure_future(self._set_health(NOT_SERVING))

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    # ---- what both protocols call ---------------------------------------------------------
    def available(self) -> AsyncEngine:
        """The engine, if requests are taken now; else Unavailable with the reason."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another")
        if self.failed:
            raise Unavailable("the server's engine failed; retry on another gateway")
        if not self.serving or self.aengine is None:
            raise Unavailable("the server is still loading its model and expert workers; retry shortly")
        return self.aengine

    async def submit(self, build: Callable[[Any, str], Request]):
        """Admit one request: `build(engine, engine_id)` makes it (tokenizing: run off the event loop).
        Returns (async engine, engine id, output stream). Raises Unavailable, InvalidRequest,
        Overloaded or EngineError. The engine's id is always fresh, so two callers choosing the same
        request id never collide. The time from here to the engine's admission counts as the
        request's arrival hop (capacity planning reads it)."""
        received = time.perf_counter()
        aengine = self.available()
        aengine.check_room()  # an overload is refused before the request is built
        engine_id = uuid.uuid4().hex
        req = await asyncio.to_thread(build, aengine.engine, engine_id)
        return aengine, engine_id, await aengine.generate(req, received_at=received)

    async def engine_lost(self) -> None:
        """An engine error reached a caller: report NOT_SERVING (the engine thread stops the server)."""
        await self._set_health(NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; idempotent (a second caller waits for the first)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping, self.draining = True, True
        if self.aengine is not None:
            self.aengine.stopping = True
        if self.expert_pool is not None:
            self.expert_pool.begin_stop()
        grace = self.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        t0 = time.monotonic()
        if self.aengine is not None:
            log.info("mesh serve: draining %d requests (grace %.1fs)", self.aengine.in_flight, grace)
            while self.aengine.in_flight and time.monotonic() - t0 < grace and not self._hurry.is_set():
                try:
                    await asyncio.wait_for(self._hurry.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
            if self.aengine.in_flight:
                log.info("mesh serve: aborting %d requests after the grace period", self.aengine.in_flight)
            self.aengine.abort_all()
        # After the grace period everything left shares one budget, so that the default 10 s grace
        # still exits well within the 20 s an orchestrator waits before SIGKILL.
        end = time.monotonic() + POST_GRACE_BUDGET
        if self.server is not None or self.http is not None:
            # time to send the final (ABORT) responses; then stragglers are cancelled
            await asyncio.gather(*([self.server.stop(1.0)] if self.server is not None else []),
                                 *([self.http.stop(1.0)] if self.http is not None else []))
        if self.aengine is not None:  # waits for a step in progress to end
            await asyncio.to_thread(self.aengine.shutdown, max(0.1, min(3.0, end - time.monotonic())))
        if self.on_shutdown is not None:
            try:
                await asyncio.wait_for(_call(self.on_shutdown), max(0.5, end - time.monotonic()))
            except Exception:  # noqa: BLE001 - shutdown goes on; the hook's failure is logged
                log.exception("mesh serve: on_shutdown failed")
        log.info("mesh serve: stopped after %.1fs", time.monotonic() - t0)
        self._stopped.set()

    def hurry(self) -> None:
        self._hurry.set()


def _pressure_signals(engine) -> Callable[[float], dict]:
    """What the expert pool's autoscaler reads besides the routed load: requests waiting for a batch
    slot, and the p90 TTFT and TPOT over the look-back period (from the engine's latency window)."""
    def signals(look_back_s: float) -> dict:
        return {"waiting": engine.num_waiting, "ttft_p90_s": engine.latency_percentile("ttft", 90, look_back_s),
                "tpot_p90_s": engine.latency_percentile("tpot", 90, look_back_s)}
    return signals


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but the thread does not keep the process alive at exit."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def work() -> None:
        try:
            value, ok = fn(), True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            value, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop is gone: nobody is waiting

    threading.Thread(target=work, name="mesh-engine-load", daemon=True).start()
    return await fut


class _Malformed:
    """What the request deserializer hands on for bytes that are not a valid message."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error

    def details(self) -> str:
        why = str(self.error) or type(self.error).__name__
        return f"the request is not a valid {self.type_name} message ({why}): send a serialized {self.type_name}"


def _parser(cls) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, TypeError, RuntimeError) as e:  # upb and python protobuf differ
            return _Malformed(cls.DESCRIPTOR.full_name, e)
    return parse


async def _authorize(gw: "Gateway | None", method: str, context) -> bool:
    """Check the caller's credentials (when the gateway requires tokens); abort if they fail."""
    if gw is None or gw.tokens is None:
        return True
    try:
        identify(dict(context.invocation_metadata() or ()), gw.tokens)
        return True
    except Unauthenticated as e:
        rec = AccessRecord("grpc", method, status=grpc.StatusCode.UNAUTHENTICATED.name)
        rec.emit()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
    return False


async def authorize(context, gw: "Gateway", role: str | None = None) -> Caller:
    """The caller of a gRPC call, for services beyond Inference (an Admin service, ...): aborts with
    UNAUTHENTICATED without valid credentials and, with `role`, PERMISSION_DENIED when the caller's
    role is another (router_service.auth.require_role: a server without tokens has no roles)."""
    try:
        caller = identify(dict(context.invocation_metadata() or ()), gw.tokens)
    except Unauthenticated as e:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
    if role is not None:
        try:
            require_role(caller, role)
        except PermissionDenied as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
    return caller


def _add_service(server: grpc.aio.Server, service, servicer: Any, module: Any, gw: "Gateway | None") -> None:
    """Register `servicer`'s methods for `service` (a ServiceDescriptor) with request parsers that
    turn unparseable bytes into INVALID_ARGUMENT, and (with a gateway) the credential check."""
    handlers = {}
    for m in service.methods:
        impl = getattr(servicer, m.name)
        parse = _parser(getattr(module, m.input_type.name))
        serialize = getattr(module, m.output_type.name).SerializeToString
        full = f"{service.full_name}/{m.name}"
        if m.client_streaming:
            raise TypeError(f"{full}: client-streaming methods are not supported here")
        if m.server_streaming:
            async def behavior(request, context, impl=impl, full=full):  # grpc wants an async generator function
                async for item in _stream(impl, request, context, full, gw):
                    yield item
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                behavior, request_deserializer=parse, response_serializer=serialize)
        else:
            async def behavior(request, context, impl=impl, full=full):
                if isinstance(request, _Malformed):
                    await _reject_malformed(request, context, full)
                if not await _authorize(gw, full, context):
                    return None
                return await impl(request, context)
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                behavior, request_deserializer=parse, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def _reject_malformed(request: _Malformed, context, method: str) -> None:
    log.info("mesh serve: %s: rejected a malformed request: %s", method, request.error)
    AccessRecord("grpc", method, status=grpc.StatusCode.INVALID_ARGUMENT.name).emit()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())


async def _stream(impl, request, context, method: str, gw: "Gateway | None"):
    if isinstance(request, _Malformed):
        await _reject_malformed(request, context, method)
    if not await _authorize(gw, method, context):
        return
    if inspect.isasyncgenfunction(impl):
        async for item in impl(request, context):
            yield item
    else:  # a coroutine writing with context.write (grpc_health's Watch)
        await impl(request, context)


@contextmanager
def _server_span(context, method: str):
    """The RPC's server span, child of the caller's W3C `traceparent` (gRPC metadata) when sent.
    Yields the context that the engine's request spans hang under."""
    parent = propagate.extract(dict(context.invocation_metadata() or ()))
    span = telemetry.tracer().start_span(
        f"{SERVICE}/{method}", context=parent, kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method})
    try:
        yield trace.set_span_in_context(span, parent)
    except asyncio.CancelledError:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
        raise
    except BaseException as e:
        code = context.code() if hasattr(context, "code") else None
        if code is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(e) or type(e).__name__))
        raise
    finally:
        span.end()


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    async def _engine(self, context) -> AsyncEngine:
        try:
            return self.gw.available()
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def _caller(self, context, rec: AccessRecord | None = None) -> Caller:
        try:
            caller = identify(dict(context.invocation_metadata() or ()), self.gw.tokens)
        except Unauthenticated as e:
            if rec is not None:
                rec.status = grpc.StatusCode.UNAUTHENTICATED.name
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if rec is not None:
            rec.tenant = caller.tenant
        return caller

    async def _start(self, msg: pb.GenerateRequest, context, rec: AccessRecord, trace_ctx=None):
        caller = await self._caller(context, rec)
        code = None
        try:
            aengine, engine_id, stream = await self.gw.submit(
                lambda engine, engine_id: convert.request_from_pb(msg, engine, engine_id, caller.tenant, trace_ctx))
        except Unavailable as e:
            code, details = grpc.StatusCode.UNAVAILABLE, str(e)
        except InvalidRequest as e:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Overloaded as e:
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except EngineError as e:
            await self._engine_lost(context, e, rec)
        if code is not None:
            rec.status = code.name
            await context.abort(code, details)
        rec.request_id = msg.request_id or engine_id
        return aengine, engine_id, stream, rec.request_id

    async def _engine_lost(self, context, e: Exception, rec: AccessRecord) -> None:
        # UNAVAILABLE, not INTERNAL: nothing is wrong with the request, and another gateway can serve it.
        rec.status = grpc.StatusCode.UNAVAILABLE.name
        await self.gw.engine_lost()
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}; retry on another gateway")

    async def _outputs(self, started, context, rec: AccessRecord):
        """A started request's outputs, each noted in the access record (tokens, finish reasons, usage).
        Leaving early (cancellation, a deadline, the caller's error) aborts the request so its KV
        blocks are freed now: callers iterate under contextlib.aclosing. A lost engine -> UNAVAILABLE."""
        aengine, engine_id, stream, _ = started
        done = False
        try:
            async for out in stream:
                if out.new_token_ids:
                    rec.token()
                if out.finished:
                    rec.finish_reasons.append(out.finish_reason.value)
                rec.usage = out.usage
                yield out
            done = True
        except EngineError as e:
            await self._engine_lost(context, e, rec)
        finally:
            if not done:
                aengine.abort(engine_id)

    async def Generate(self, request, context):
        rec = AccessRecord("grpc", f"{SERVICE}/Generate")
        try:
            with _server_span(context, "Generate") as trace_ctx:
                started = await self._start(request, context, rec, trace_ctx)
                async with contextlib.aclosing(self._outputs(started, context, rec)) as outputs:
                    async for out in outputs:
                        yield convert.output_to_pb(out, started[3])
        except asyncio.CancelledError:
            rec.status = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            rec.emit()

    async def Complete(self, request, context):
        rec = AccessRecord("grpc", f"{SERVICE}/Complete")
        try:
            with _server_span(context, "Complete") as trace_ctx:
                return await self._complete(request, context, rec, trace_ctx)
        except asyncio.CancelledError:
            rec.status = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            rec.emit()

    async def _complete(self, request, context, rec: AccessRecord, trace_ctx):
        started = await self._start(request, context, rec, trace_ctx)
        rid = started[3]
        n = request.sampling.n if request.sampling.HasField("n") else 1
        ids: list[list[int]] = [[] for _ in range(max(1, n))]
        text: list[list[str]] = [[] for _ in ids]
        logprobs: list[list] = [[] for _ in ids]
        reasons: list = [None] * len(ids)
        last = None
        async with contextlib.aclosing(self._outputs(started, context, rec)) as outputs:
            async for out in outputs:
                ids[out.index] += out.new_token_ids
                text[out.index].append(out.new_text)
                logprobs[out.index] += out.logprobs or ()
                if out.finished:
                    reasons[out.index] = out.finish_reason
                last = out
        if last is None:
            rec.status = grpc.StatusCode.INTERNAL.name
            await context.abort(grpc.StatusCode.INTERNAL, "the engine ended the request without output")
        with_logprobs = request.sampling.HasField("logprobs")
        choices = [convert.completion_to_pb(i, ids[i], "".join(text[i]), reasons[i],
                                            logprobs[i] if with_logprobs else None) for i in range(len(ids))]
        first = choices[0]
        resp = pb.GenerateResponse(request_id=rid, token_ids=first.token_ids, text=first.text,
                                   finish_reason=first.finish_reason, usage=convert.usage_to_pb(last.usage),
                                   index=0, logprobs=first.logprobs)
        if len(choices) > 1:
            resp.completions.extend(choices)
        return resp

    async def Tokenize(self, request, context):
        aengine = await self._engine(context)
        tok = aengine.engine.tokenizer
        if tok is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{aengine.engine.model_dir} has no tokenizer.json: this model only takes "
                                "prompt_token_ids")
        ids = await asyncio.to_thread(tok.encode, request.text)
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        aengine = await self._engine(context)
        return convert.model_info(aengine.engine, self.gw.num_workers, aengine.max_queued)

    async def GetServerStats(self, request, context):
        # Read off the engine thread: the queue/KV figures come from AsyncEngine's own snapshot; the
        # engine's stats are plain counters and a copy of the load tensor (a row may be one step newer
        # than another: fine for load figures).
        aengine = await self._engine(context)
        s, st = aengine.stats(), aengine.engine.stats(expert_load=True)
        load = st.pool.expert_load  # [L, E] int64
        return pb.ServerStats(
            running=s["running"], waiting=s["waiting"], kv_blocks_used=s["blocks_used"],
            kv_blocks_free=s["blocks_free"], steps=st.steps, in_flight=s["in_flight"],
            expert_load=load.reshape(-1).clamp_(min=0).tolist(), moe_layers=st.pool.moe_layers,
            num_experts=st.pool.num_experts, max_num_seqs=st.max_num_seqs,
            max_num_batched_tokens=st.max_num_batched_tokens, preemptions=st.preemptions,
            **_step_counters(aengine, st, request.steps_after if request.HasField("steps_after") else None))


def _step_counters(aengine: AsyncEngine, st: EngineStats, steps_after: int | None = None) -> dict:
    """ServerStats' step-time counters (see the proto): what `mesh loadtest` records for `mesh plan`."""
    import torch
    work = aengine.engine.observer.work
    out = {"busy_seconds": aengine.busy_seconds, "busy_cpu_seconds": aengine.busy_cpu_seconds,
           "expert_seconds": st.pool.expert_seconds, "expert_cpu_seconds": st.pool.expert_cpu_seconds,
           "worker_compute_seconds": list(st.pool.worker_compute_seconds),
           "arrival_hop_seconds": aengine.arrival_hop_seconds, "arrivals": aengine.arrivals,
           "delivery_hop_seconds": aengine.delivery_hop_seconds, "deliveries": aengine.deliveries,
           "compute_threads": torch.get_num_threads(),
           "worker_threads": st.pool.worker_threads}
    out["recent_steps"] = [pb.StepRecord(
        step=r[0], sequences=r[1], decode_tokens=r[2], prefill_tokens=r[3], context_tokens=r[4], busy_seconds=r[5],
        forward_seconds=r[6], expert_seconds=r[7], worker_compute_seconds=r[8], busy_cpu_seconds=r[9],
        forward_cpu_seconds=r[10], expert_cpu_seconds=r[11])
        for r in (work.since(steps_after) if steps_after is not None else ())]
    out.update(forward_seconds=work.forward_seconds, forward_cpu_seconds=work.forward_cpu_seconds,
               decode_tokens=work.decode_tokens,
               prefill_tokens=work.prefill_tokens, context_tokens=work.context_tokens,
               scheduled_sequences=work.sequences)
    return out


async def serve(engine_factory: EngineFactory, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                ready: Hook = None, on_shutdown: Hook = None, max_queued: int = DEFAULT_MAX_QUEUED,
                grace: float = DEFAULT_GRACE, num_workers: int = 0, http_port: int | None = None,
                model_name: str = "", admin_token: str | None = None, expert_pool: Any = None,
                tokens: TokenTable | None = None, tls: TlsFiles | None = None,
                started: Callable[[Gateway], Awaitable[None] | None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (a second one cuts the grace period short) or until the engine
    dies. Returns the exit code: 0 after a clean stop, 1 when the engine failed to load or failed
    while serving (a lost expert worker breaks the collective group; the supervisor restarts us).
    `ready`: returns true once all expert workers are loaded and joined (None: ready when the engine
    is built). `on_shutdown`: runs last."""
    gw = Gateway(engine_factory, host, port, ready=ready, on_shutdown=on_shutdown, max_queued=max_queued,
                 grace=grace, num_workers=num_workers, http_port=http_port, model_name=model_name,
                 admin_token=admin_token, expert_pool=expert_pool, tokens=tokens, tls=tls)
    stop = gw.stop_requested
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        gw.stop_signalled = True
        if gw.aengine is not None:
            gw.aengine.stopping = True  # the same signal may be reaching the expert workers now
        if gw.expert_pool is not None:
            gw.expert_pool.begin_stop()  # ...so a worker lost now is not replaced
        if stop.is_set():
            log.info("mesh serve: %s again: aborting in-flight requests now", sig.name)
            gw.hurry()
        else:
            log.info("mesh serve: %s: shutting down (grace %.1fs)", sig.name, gw.grace)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests run serve() in a thread and stop it themselves)
    await gw.start()
    if started is not None:
        await _call(lambda: started(gw))
    loading = asyncio.create_task(gw.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        log.error("mesh: error: could not load the engine: %s", loading.exception())
        code = 1
    else:
        await stopping
        code = 1 if gw.failed else 0
        loading.cancel()
    stopping.cancel()
    await gw.stop()
    return code


def run_server(engine_factory: EngineFactory, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               **kw) -> int:
    """Blocking form of `serve` for the CLI."""
    return asyncio.run(serve(engine_factory, host, port, **kw))
