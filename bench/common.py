"""Shared benchmark helpers: the model under test, machine roofline, JSON-line output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def bench_model(arch: str = "qwen3_moe", preset: str = "bench") -> Path:
    """The preset checkpoint, built once under bench/out/."""
    from mesh.presets import init_model
    out = ROOT / "bench" / "out" / f"{arch}-{preset}"
    if not (out / "config.json").is_file():
        init_model(arch, preset, out, seed=0, progress=lambda s: print(s, file=sys.stderr))
    return out


def start_serve(work: Path, *args: str, timeout: float = 300.0):
    """`mesh serve --port 0 ARGS` in a session of its own, logging to WORK/serve.log (a file: access
    lines would fill a pipe); returns (process, "127.0.0.1:PORT") once it listens. The caller stops it
    (SIGTERM; the session's group on a timeout)."""
    import re
    import subprocess
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--port", "0", *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()  # the child holds its own descriptor
    deadline = time.monotonic() + timeout
    while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", (work / "serve.log").read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"mesh serve did not start:\n{(work / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{m.group(1)}"


def stop_serve(proc, timeout: float = 30.0) -> None:
    import signal
    import subprocess
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of xs (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from mesh.model.cpu import native
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "bf16_products": native.bf16_products()}  # amx, wide, vdpbf16ps or None (torch ops)


def sync() -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock timings include it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype, n: int = 2048, device: str = "cpu") -> float:
    """Measured FLOP/s of a square matmul in `dtype` on this machine, now: the faster of torch.mm and,
    on the CPU, this project's own linear kernel (which beats torch's float32 GEMM on some CPUs: a
    roofline from the slower one would let a step look faster than the machine)."""
    return max(gemm_peaks(dtype, n, device).values())


def gemm_peaks(dtype: torch.dtype, n: int = 2048, device: str = "cpu") -> dict[str, float]:
    """FLOP/s of an n x n x n product through torch.mm and (CPU, where it runs) mesh's native linear."""
    if device != "cpu":
        n = max(n, 8192)  # a GPU needs a big product to reach its peak
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    t = time.perf_counter()
    torch.mm(a, b)
    sync()
    once = time.perf_counter() - t
    # a product that takes seconds once is not run seven times more: oneDNN's bf16 on CPUs without
    # AVX512-BF16 (AMD Zen 3) does 0.34 GFLOP/s, 50 s a call, and the decode roofline asks 4 times
    out = {"torch": 2 * n ** 3 / (once if once > 1.0 else median_time(lambda: torch.mm(a, b), repeat=5))}
    if device == "cpu":
        from mesh.model.cpu import native
        packed = native.pack_linear(b)
        if packed is not None and native.linear(a, packed) is not None:
            out["native"] = 2 * n ** 3 / median_time(lambda: native.linear(a, packed), repeat=5)
    return out


def memory_bandwidth(nbytes: int = 512 << 20, device: str = "cpu") -> float:
    """Measured bytes/s of reading a large buffer (a sum over it), now."""
    if device != "cpu":
        nbytes = max(nbytes, 4 << 30)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = median_time(lambda: x.sum(), repeat=5)
    return nbytes / t


def bare_exchange_seconds(disp, steps: int, repeat: int = 5) -> float:
    """Per-layer seconds of a bare all_to_all_single exchange of the rows `disp` (a CollectiveDispatcher)
    routed per step over its last `steps` steps (median of `repeat` exchanges): the transport baseline."""
    counts = (disp.slot_load.float() / steps).round().to(torch.int64)  # [L, P] rows per step
    return statistics.median(statistics.mean(disp.bare_exchange(counts)) for _ in range(repeat))


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def threads_from_env() -> None:
    torch.set_num_threads(int(os.environ.get("MESH_BENCH_THREADS", os.cpu_count() or 1)))
