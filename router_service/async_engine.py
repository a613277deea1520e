"""Run a synchronous `Engine` behind asyncio: one engine thread, many awaiting callers.

What must stay true:
- Only the engine thread touches the engine's state (add_request, abort, step, the block pool):
  none of it is thread-safe. Callers talk to it through `_inbox`, a thread-safe queue; outputs go back
  to each request's `asyncio.Queue` with `loop.call_soon_threadsafe`, once per step per event loop.
- The engine loop never runs on the event loop: a step takes milliseconds to seconds and would stall
  every other stream, health check and cancellation.
- When idle the thread sleeps in `_inbox.get()`; it spins only while the engine has work.
- If the engine thread dies, every request in flight (and every later one) gets `EngineError`
  instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from mesh.model.dispatch import ExpertsUnavailable
from mesh.types import FinishReason, InvalidRequest, Request, RequestOutput, Usage

if TYPE_CHECKING:
    from mesh.engine.engine import Engine
from router_service import DEFAULT_MAX_QUEUED

log = logging.getLogger("mesh.serve")


class Overloaded(Exception):
    """The server already holds its limit of requests (running + waiting); the caller should retry."""


class EngineError(RuntimeError):
    """The engine thread failed or was shut down; the request cannot complete."""


@dataclass
class _Route:
    """Where one request's outputs go. Owned by the engine thread once the request is added."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    admitted: asyncio.Future  # resolved when add_request accepted or rejected the request
    unfinished: set[int] = field(default_factory=lambda: {0})  # indices of completions not yet finished
    usage: Usage = field(default_factory=Usage)


class AsyncEngine:
    def __init__(self, engine: Engine, max_queued: int = DEFAULT_MAX_QUEUED,
                 on_failure: Callable[[BaseException], None] | None = None):
        """`on_failure(error)` runs in the engine thread if the engine dies (after every request in
        flight has been failed with EngineError)."""
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.engine = engine
        self.max_queued = max_queued
        self.on_failure = on_failure
        self.stopping = False  # set by the server when it starts draining
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Guards _in_flight and _error together with putting onto the inbox, so a request is either
        # refused up front or seen by the engine thread (which fails it if the engine has died).
        self._lock = threading.Lock()
        self._in_flight = 0
        self._error: BaseException | None = None
        self._routes: dict[str, _Route] = {}  # engine thread only
        # seconds in loop passes that ran a step, and the engine thread's CPU in them (written by the
        # engine thread, read by GetServerStats)
        self.busy_seconds = self.busy_cpu_seconds = 0.0
        # the hops outside the engine thread (GetServerStats): a request's from the RPC's arrival to the
        # inbox (noted by the server), a step's outputs from the engine thread to their event loop
        self.arrival_hop_seconds, self.arrivals = 0.0, 0
        self.delivery_hop_seconds, self.deliveries = 0.0, 0
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="mesh-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any thread with a running event loop) --------------------------------
    async def generate(self, request: Request, received_at: float | None = None) -> AsyncIterator[RequestOutput]:
        """Admit `request`; returns an async iterator of its outputs (deltas of each of its n
        completions, told apart by `index`; each completion's last has `finished`, and the iteration
        ends after the last completion's). Raises InvalidRequest (the engine's message), Overloaded or
        EngineError before any output. Leaving the iteration early (break, cancellation) aborts the
        request. `received_at`: time.perf_counter() when the request arrived (counted in
        arrival_hop_seconds)."""
        loop = asyncio.get_running_loop()
        self.check_room()
        if received_at is not None:
            self.arrival_hop_seconds += time.perf_counter() - received_at
            self.arrivals += 1
        route = _Route(loop, asyncio.Queue(), loop.create_future(), set(range(request.sampling.n)))
        with self._lock:
            if self._error is not None:
                raise EngineError(f"the engine is not running: {self._error}")
            if self._in_flight >= self.max_queued:
                raise Overloaded(f"the server is at its limit of {self.max_queued} queued and running "
                                 f"requests; retry later")
            self._in_flight += 1
            self._inbox.put(("add", request, route))
        try:
            await route.admitted
        except asyncio.CancelledError:
            self.abort(request.request_id)  # it may have been added meanwhile
            raise
        return self._outputs(request.request_id, route.queue, request.sampling.n)

    async def _outputs(self, request_id: str, q: asyncio.Queue, n: int) -> AsyncIterator[RequestOutput]:
        finished = False
        left = n
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                left -= item.finished
                finished = left == 0
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks (in the engine thread, before its next step).
        A no-op for unknown or finished requests. Safe from any thread."""
        self._inbox.put(("abort", request_id, None))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all", None, None))

    def call_between_steps(self, fn) -> None:
        """Run `fn()` on the engine thread before its next step (at once when idle): for work that
        must sit between two steps, such as an expert pool's placement switch. Safe from any thread;
        an exception from `fn` fails the engine like a failed step."""
        self._inbox.put(("call", fn, None))

    def stats(self) -> dict:
        """running/waiting sequences and KV blocks as of the engine thread's last pass, plus the
        admitted requests not yet finished (in_flight)."""
        with self._lock:
            return {**self._stats, "in_flight": self._in_flight, "max_queued": self.max_queued,
                    "alive": self._error is None}

    def check_room(self) -> None:
        """Raise Overloaded now if a request would be refused for want of room: a caller checks this
        before the work of building a request (parsing, tokenizing in a thread), so that refusing an
        overload costs next to nothing. `generate` checks again when it admits."""
        if self._in_flight >= self.max_queued:
            raise Overloaded(f"the server is at its limit of {self.max_queued} queued and running "
                             f"requests; retry later")

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight, close the engine (its `close()`, if it has one) and stop the
        engine thread. Blocks until it has stopped (at most `timeout` seconds)."""
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------
    def _snapshot(self) -> dict:
        e = self.engine
        return {"running": e.num_running, "waiting": e.num_waiting,
                "blocks_used": e.blocks.num_used, "blocks_free": e.blocks.num_free}

    def _run(self) -> None:
        cmds: collections.deque = collections.deque()  # taken from the inbox, not yet handled
        try:
            while True:
                # Sleep on the inbox when there is nothing to step; otherwise take what has arrived.
                if not self.engine.has_unfinished():
                    cmds.append(self._inbox.get())
                t0, c0 = time.perf_counter(), time.thread_time()
                while True:
                    try:
                        cmds.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                while cmds:
                    kind, arg, route = cmds[0]
                    if kind == "stop":
                        cmds.popleft()
                        self._abort_all()
                        self._fail(EngineError("the server is shutting down"), cmds)
                        self._close_engine()
                        return
                    self._handle(kind, arg, route)
                    cmds.popleft()
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                    busy, cpu = time.perf_counter() - t0, time.thread_time() - c0
                    self.busy_seconds += busy
                    self.busy_cpu_seconds += cpu
                    self.engine.observer.work.end_pass(busy, cpu)  # the step's record (GetServerStats' recent_steps)
                stats = self._snapshot()
                with self._lock:
                    self._stats = stats
        except BaseException as e:  # noqa: BLE001 - whatever killed the loop must reach the callers
            if self.stopping:
                # A stop signal sent to the whole process group reached the expert workers too: an
                # expected end, said in a line rather than a traceback.
                log.warning("the engine stopped while the server was draining (its expert workers went "
                            "away: a stop signal to the whole process group reaches them too): %s: %s",
                            type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            elif isinstance(e, ExpertsUnavailable):  # said in the product's words, no traceback
                log.error("mesh serve: %s", e)
            else:
                log.exception("the engine thread failed")
            error = EngineError(str(e) if isinstance(e, ExpertsUnavailable) else
                                f"the engine failed: {type(e).__name__}: {e}")
            self._fail(error, cmds)
            if self.on_failure is not None:
                try:
                    self.on_failure(error)
                except Exception:  # noqa: BLE001 - the callers already have their errors
                    log.exception("the engine failure hook failed")

    def _close_engine(self) -> None:
        # The engine flushes its background work (a remote prefix-cache writer) in close().
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.exception("closing the engine failed")

    def _handle(self, kind: str, arg: Any, route: _Route | None) -> None:
        if kind == "add":
            try:
                self.engine.add_request(arg)
            except InvalidRequest as e:
                self._release()
                _resolve(route, exc=e)
                return
            self._routes[arg.request_id] = route
            _resolve(route)
        elif kind == "abort":
            self._abort(arg)
        elif kind == "abort_all":
            self._abort_all()
        elif kind == "call":
            arg()

    def _abort(self, request_id: str) -> None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return
        self.engine.abort(request_id)
        self._release()
        # A listener that is still there learns why its stream ended.
        outs = [(route.queue, RequestOutput(request_id, [], "", True, FinishReason.ABORT, route.usage, index))
                for index in sorted(route.unfinished)]
        _call_soon(route.loop, _put_all, outs)

    def _abort_all(self) -> None:
        for rid in list(self._routes):
            self._abort(rid)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            route.usage = out.usage
            if out.finished:
                route.unfinished.discard(out.index)
                if not route.unfinished:
                    del self._routes[out.request_id]
                    self._release()
            by_loop.setdefault(route.loop, []).append((route.queue, out))
        now = time.perf_counter()
        for loop, items in by_loop.items():
            _call_soon(loop, self._put_timed, items, now)

    def _put_timed(self, items: list, sent: float) -> None:
        # on the event loop: how long the step's outputs waited for it (only that loop writes these)
        self.delivery_hop_seconds += time.perf_counter() - sent
        self.deliveries += 1
        _put_all(items)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _fail(self, error: EngineError, taken: collections.deque) -> None:
        with self._lock:
            self._error = error
        # Commands already taken, and everything put on the inbox before _error was set: fail them.
        pending = list(taken)
        while True:
            try:
                pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        refused = [route for kind, _arg, route in pending if kind == "add"]
        failed, self._routes = list(self._routes.values()), {}
        # Count them out before telling anyone, so a caller that wakes up sees consistent stats.
        with self._lock:
            self._in_flight -= len(refused) + len(failed)
        for route in refused:
            _resolve(route, exc=error)
        for route in failed:
            _call_soon(route.loop, _put_all, [(route.queue, error)])


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: its callers are gone
        pass


def _resolve(route: _Route, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if route.admitted.done():  # the caller was cancelled while waiting
            return
        if exc is None:
            route.admitted.set_result(None)
        else:
            route.admitted.set_exception(exc)
    _call_soon(route.loop, settle)
