"""Stopping `mesh serve` the way supervisors do: SIGTERM or SIGINT to the server's whole process group
(systemd's default, `kill -- -PGID`), with and without expert workers in Ray, while streams are in
flight. The server must drain and exit within the 20 s an orchestrator waits before SIGKILL, leave no
process of its session behind, and `--ray-address auto` must not join the running server's private
Ray cluster."""

from __future__ import annotations

import asyncio

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from router_service.client import MeshClient, MeshError

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN = 20.0  # what Kubernetes/systemd give a process between SIGTERM and SIGKILL


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mesh.presets import init_model
    return init_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("stop") / "tiny")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,cmd=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _serve(tiny_dir, port, *extra, log):
    return subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--model", str(tiny_dir), "--port", str(port),
                             "--dtype", "float32", *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own session and process group, as under systemd


def _listening(proc, log_path, timeout=300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+:\d+)", log_path.read_text())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            pytest.fail(f"mesh serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"mesh serve did not start listening:\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("workers,sig", [(0, signal.SIGINT), (2, signal.SIGTERM)])
def test_signal_to_the_process_group_drains_and_exits(tiny_dir, tmp_path, workers, sig):
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # port 0 and the port read from the log: a port picked here could be taken by Ray meanwhile
        proc = _serve(tiny_dir, 0, "--workers", str(workers), log=log)
    try:
        target = _listening(proc, log_path)
        with MeshClient(target) as c:
            c.wait_ready(300)
        token_mode = None
        if workers:
            m = re.search(r"token authentication \(token in (\S+)\)", log_path.read_text())
            token_mode = os.stat(m.group(1)).st_mode & 0o777 if m else None
            # another server's attempt to use "auto" must not join this one's private cluster
            env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "no-ray-start")}
            (tmp_path / "no-ray-start").mkdir()
            other = subprocess.run([sys.executable, "-m", "mesh_cli", "serve", "--model", str(tiny_dir), "--port",
                                    str(_port()), "--workers", "1", "--ray-address", "auto"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=120)
            assert other.returncode != 0
            assert "no Ray cluster started with `ray start` was found" in other.stderr, other.stderr[-2000:]
        outcomes: list = []

        def stream(i):
            with MeshClient(target, timeout=120) as c:
                try:
                    n = 0
                    for out in c.generate(prompt_token_ids=[1, 2, 3 + i], max_tokens=2000, ignore_eos=True):
                        if not n and out.new_token_ids:
                            started.release()
                        n += len(out.new_token_ids)
                    outcomes.append(("done", n))
                except MeshError as e:
                    outcomes.append((e.code.name, e.details))
        started = threading.Semaphore(0)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=120)
        os.killpg(proc.pid, sig)
        t0 = time.monotonic()
        try:
            code = proc.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mesh serve did not exit within {STOP_WITHIN:.0f}s of {sig.name} to its group:\n"
                        + log_path.read_text()[-3000:])
        for t in threads:
            t.join(30)
        left = []
        for _ in range(50):  # Ray's processes share the server's fate: they go within moments
            left = _session(proc.pid)
            if not left:
                break
            time.sleep(0.2)
        text = log_path.read_text()
        assert left == [], left
        assert len(outcomes) == 4, outcomes  # every stream got an answer: tokens, or an error to act on
        for what, detail in outcomes:
            assert what in ("done", "UNAVAILABLE"), (what, detail)
        assert f"{sig.name}: shutting down" in text and "stopped after" in text
        if workers:  # the private cluster's token was in a directory of its own, removed at exit
            token = re.search(r"token authentication \(token in (\S+)\)", text)
            assert token, text[-3000:]
            assert token_mode == 0o600 and not Path(token.group(1)).exists()
        assert "Traceback" not in text, text[-3000:]
        if not workers:  # nothing killed the engine: the drain ended each stream (finish reason abort)
            assert code == 0 and all(what == "done" for what, _ in outcomes), (code, outcomes)
        print(f"exit code {code} after {time.monotonic() - t0:.1f}s; {outcomes}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class WorkersGoneOnStop:
    """The engine as the group signal leaves it: its expert workers stop with the gateway's SIGTERM, so
    the first step after the stop began fails as the collective's would."""

    def __init__(self, engine):
        self._e, self.aengine = engine, None

    def __getattr__(self, name):
        return getattr(self._e, name)

    def step(self):
        time.sleep(0.005)
        if self.aengine is not None and self.aengine.stopping:
            raise RuntimeError("Read error [127.0.0.1]:10654: Connection reset by peer")
        return self._e.step()


def test_workers_gone_while_draining_is_an_orderly_stop(tiny_dir):
    import logging

    import grpc

    from conftest import LiveGateway, LogCapture, engine_factory

    cap = LogCapture()
    logging.getLogger().addHandler(cap)
    engine = WorkersGoneOnStop(engine_factory(tiny_dir)())
    live = LiveGateway(lambda: engine, grace=10)
    engine.aengine = live.gw.aengine
    try:
        with MeshClient(live.target, timeout=60) as c:
            stream = c.generate(prompt_token_ids=[1, 2, 3], max_tokens=1500, ignore_eos=True)
            next(stream)
            live.gw.stop_signalled = True  # as serve's signal handler does
            live.gw.aengine.stopping = True
            stopping = asyncio.run_coroutine_threadsafe(live.gw.stop(), live.loop)
            with pytest.raises(MeshError) as e:
                list(stream)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            stopping.result(30)
        assert not live.gw.failed  # a requested stop: exit code 0, not a crash for the supervisor
        assert cap.tracebacks() == []
        assert any("stopped while the server was draining" in r.getMessage() for r in cap.records)
    finally:
        logging.getLogger().removeHandler(cap)
        live.loop.call_soon_threadsafe(live.loop.stop)


def test_waiting_for_ray_resources_says_what_is_missing(tiny_dir, caplog):
    """Workers asking for more CPUs than the cluster has: the wait is logged with the numbers, and ends
    with an error after the load timeout instead of hanging."""
    import logging

    from expert_workers.pool import ExpertPool, PoolError
    pool = ExpertPool(str(tiny_dir), "float32", 2, worker_cpus=1000, load_timeout=12)
    caplog.set_level(logging.INFO, logger="mesh.pool")
    try:
        with pytest.raises(PoolError) as e:
            pool.start()
        assert "gave up after" in str(e.value) and "CPU 2000" in str(e.value)
        waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert waits and "for Ray resources: 2 workers need CPU 2000" in waits[0] and "free of" in waits[0], waits
    finally:
        pool.shutdown(3.0)
