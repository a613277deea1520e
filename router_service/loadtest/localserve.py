"""`mesh serve` in a child process on a free loopback port: the deployments that `mesh profile`
sweeps and `mesh plan --validate` measures on this machine.

    with LocalServer(workers=2, model="m/", serve_args=["--dtype", "float32"], log=path) as srv:
        run_loadtest(LoadTest(target=srv.target, ...))
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeError(RuntimeError):
    pass


class LocalServer:
    """One `mesh serve --workers W` (its own session: stopping it stops its Ray workers too).

    `env`: variables added to this process's environment (e.g. OMP_NUM_THREADS). `log`: a file that
    gets the server's output (the last lines are quoted when it fails to start)."""

    def __init__(self, workers: int = 0, model: str | None = None, serve_args: list[str] | None = None,
                 env: dict[str, str] | None = None, log: str | Path | None = None, start_timeout: float = 300.0):
        self.workers, self.model = workers, model
        self.serve_args = list(serve_args or [])
        self.env = dict(env or {})
        self.log_path = Path(log) if log else None
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mesh_cli", "serve", "--workers", str(self.workers), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "WARNING"]
        if self.model:
            cmd += ["--model", str(self.model)]
        return cmd + self.serve_args

    def start(self) -> "LocalServer":
        from router_service.client import MeshClient, MeshError
        self.port = free_port()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(self.command(), stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": pythonpath, **self.env})
        deadline = time.monotonic() + self.start_timeout
        with MeshClient(self.target, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServeError(f"`mesh serve --workers {self.workers}` exited with code "
                                     f"{self.proc.returncode} before serving{self._tail()}")
                try:
                    if client.health(timeout=2) == "SERVING":
                        break
                except MeshError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServeError(f"`mesh serve --workers {self.workers}` was not SERVING after "
                                     f"{self.start_timeout:.0f}s{self._tail()}")
                time.sleep(0.3)
            # one request through every layer (and every worker) before anything is measured
            client.complete(prompt_token_ids=list(range(1, 65)), max_tokens=8, temperature=0, ignore_eos=True,
                            timeout=120)
        return self

    def _tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        if self._log is not None:
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return (f"; the last lines of {self.log_path}:\n" + "\n".join(text)) if text else ""

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drains, then stops its expert workers and private Ray
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
