"""`mesh serve --workers 2`: the whole system over real gRPC on loopback with a private Ray cluster.
Greedy tokens equal the single-process engine's and transformers' for concurrent streams of
different lengths, for every family; SIGTERM leaves no process behind; a lost expert worker makes the
gateway answer UNAVAILABLE and exit with code 1 on its own, leaving nothing behind."""

import os
import signal
import subprocess
import sys
import time
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from conftest import FAMILIES, ROOT, hf_greedy
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams
from router_service.client import MeshClient, MeshError


def _processes(tag: str) -> set[int]:
    """PIDs of the processes a server started by this test left: every process whose environment holds
    the test's own tag (the server, and Ray's head, raylet and workers, which inherit it), so other
    Ray clusters or servers on the machine are never counted."""
    marker = f"MESH_TEST_TAG={tag}".encode()
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            out.add(int(pid))
    return out


def _assert_nothing_left(tag: str, timeout: float = 30.0) -> None:
    """Wait (generously: exiting processes take a moment to be reaped) until no process carries the tag."""
    deadline = time.monotonic() + timeout
    while (leftover := _processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftover, f"processes left behind: {leftover}"


def _start(model_dir, workers=2, tag=""):
    """`mesh serve --port 0` (the server binds a free port itself and logs it: no port picked here and
    reused, which another process could take in between). Output goes to a file: `_log(proc)`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESH_TEST_TAG=tag)
    log = tempfile.NamedTemporaryFile("w+", prefix="mesh-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--model", str(model_dir),
                             "--workers", str(workers), "--port", "0", "--dtype", "float32",
                             "--grace-period", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log_path = Path(log.name)
    log.close()
    deadline = time.monotonic() + 120
    client = None
    while client is None or _health(client) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mesh serve did not become SERVING:\n{_log(proc)}")
        if client is None and "listening on 127.0.0.1:" in (text := _log(proc)):
            port = int(text.split("listening on 127.0.0.1:")[1].split()[0])
            client = MeshClient(f"127.0.0.1:{port}", timeout=60)
        time.sleep(0.3)
    return proc, client


def _log(proc) -> str:
    return proc.log_path.read_text(errors="replace")


def _health(client) -> str:
    try:
        return client.health(timeout=2)
    except MeshError:  # not listening yet
        return "DOWN"


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mesh serve did not exit within 20 s of SIGTERM")


@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_over_grpc_matches_local_and_transformers(family, hf_checkpoints, hf_models):
    tag = uuid.uuid4().hex
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 17, 40, 64, 9)]
    proc, client = _start(hf_checkpoints[family], tag=tag)
    try:
        info = client.model_info()
        assert info["num_expert_workers"] == 2
        with ThreadPoolExecutor(len(prompts)) as ex:  # concurrent streams of different lengths
            outs = list(ex.map(lambda p: client.complete(prompt_token_ids=p, max_tokens=7, temperature=0,
                                                         ignore_eos=True), prompts))
        streamed = [t for d in client.generate(prompt_token_ids=prompts[2], max_tokens=7, temperature=0,
                                               ignore_eos=True) for t in d.new_token_ids]
    finally:
        _stop(proc)
    assert proc.returncode == 0, _log(proc)
    local = Engine(hf_checkpoints[family], EngineConfig(dtype="float32"))
    greedy = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    want_local = [o.token_ids for o in local.generate([local.make_request(prompt_token_ids=p, sampling=greedy)
                                                       for p in prompts])]
    refs = [hf_greedy(hf_models[family], p, 7) for p in prompts]
    assert [o["token_ids"] for o in outs] == want_local == refs
    assert streamed == refs[2]
    _assert_nothing_left(tag)


def test_every_expert_worker_lost_stops_the_gateway_with_exit_code_1(hf_checkpoints):
    """Both workers SIGKILLed (one lost worker is survived: tests/e2e/test_worker_loss.py): a request
    gets UNAVAILABLE saying so in the product's words, and the gateway exits with code 1."""
    tag = uuid.uuid4().hex
    proc, client = _start(hf_checkpoints["qwen3_moe"], tag=tag)
    try:
        assert client.complete(prompt_token_ids=[1, 2, 3], max_tokens=2, temperature=0)["token_ids"]
        workers = []
        for pid in _processes(tag):
            try:
                if b"RayExpertWorker" in open(f"/proc/{pid}/cmdline", "rb").read():
                    workers.append(pid)
            except OSError:
                pass
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # what an OOM kill or a lost node does
        with pytest.raises(MeshError) as err:
            client.complete(prompt_token_ids=[4, 5, 6], max_tokens=2, temperature=0)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        assert "every expert worker of this gateway is lost" in err.value.details, err.value
        assert "retry on another gateway" in err.value.details
        proc.wait(timeout=20)  # it stops by itself, for its supervisor to restart it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = _log(proc)
    assert proc.returncode == 1, log
    assert "so that a supervisor restarts this gateway" in log
    assert "Traceback" not in log, log[-3000:]
    _assert_nothing_left(tag)
