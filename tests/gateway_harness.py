"""A gateway on a free loopback port for tests (tests/router_service, tests/cache): LiveGateway runs the
real Gateway in an event loop of its own; SlowEngine makes each engine step take a few milliseconds."""

from __future__ import annotations

import asyncio
import threading
import time

from router_service.server import Gateway


class LiveGateway:
    """A Gateway on a free loopback port, its event loop in a background thread."""

    def __init__(self, engine_factory, load=True, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gw = Gateway(engine_factory, "127.0.0.1", 0, **kw)
        self.call(self.gw.start())
        self.target = f"127.0.0.1:{self.gw.port}"
        self.loading = asyncio.run_coroutine_threadsafe(self.gw.load(), self.loop)
        if load:
            self.loading.result(60)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self):
        return self.gw.aengine.stats()

    def wait_idle(self, timeout=10.0):
        """Until no request is in flight and every KV block is back (the engine's own count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s["in_flight"] == 0 and s["blocks_used"] == 0 and self.gw.engine.blocks.num_used == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"requests or KV blocks not freed: {self.stats()}")

    def close(self):
        self.call(self.gw.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class SlowEngine:
    """Any object with the Engine's interface serves; this one takes 5 ms a step (timing-proof drain)."""

    def __init__(self, engine, delay=0.005):
        self._e, self._delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._e, name)

    def step(self):
        time.sleep(self._delay)
        return self._e.step()
