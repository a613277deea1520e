"""`mesh serve --workers 2`: the whole system over real gRPC on loopback with a private Ray cluster.
Greedy tokens equal the single-process engine's and transformers' for concurrent streams of
different lengths, for every family; SIGTERM leaves no process behind."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import FAMILIES, ROOT, free_port, hf_greedy
from router_service.client import MeshClient, MeshError


def _processes() -> set[int]:
    """PIDs of every process whose command line mentions ray or mesh serve."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray" in cmd or b"mesh serve" in cmd or b"router_service" in cmd:
            out.add(int(pid))
    return out


def _start(model_dir, workers=2):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "serve", "--model", str(model_dir),
                             "--workers", str(workers), "--port", str(port), "--dtype", "float32",
                             "--grace-period", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    client = MeshClient(f"127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 120
    while _health(client) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mesh serve did not become SERVING:\n{proc.stdout.read()}")
        time.sleep(0.3)
    return proc, client


def _health(client) -> str:
    try:
        return client.health(timeout=2)
    except MeshError:  # not listening yet
        return "DOWN"


def _stop(proc) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mesh serve did not exit within 20 s of SIGTERM")
    return time.monotonic() - t0


@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_over_grpc_matches_local_and_transformers(family, hf_checkpoints, hf_models):
    before = _processes()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 17, 40, 64, 9)]
    proc, client = _start(hf_checkpoints[family])
    try:
        info = client.model_info()
        assert info["num_expert_workers"] == 2
        with ThreadPoolExecutor(len(prompts)) as ex:  # concurrent streams of different lengths
            outs = list(ex.map(lambda p: client.complete(prompt_token_ids=p, max_tokens=7, temperature=0,
                                                         ignore_eos=True), prompts))
        streamed = [t for d in client.generate(prompt_token_ids=prompts[2], max_tokens=7, temperature=0,
                                               ignore_eos=True) for t in d.new_token_ids]
    finally:
        took = _stop(proc)
    assert proc.returncode == 0, proc.stdout.read()
    assert took < 20
    refs = [hf_greedy(hf_models[family], p, 7) for p in prompts]
    assert [o["token_ids"] for o in outs] == refs
    assert streamed == refs[2]
    time.sleep(1.0)
    leftover = _processes() - before
    assert not leftover, f"processes left behind: {leftover}"
