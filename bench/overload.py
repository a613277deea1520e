"""Overload: ten times a gateway's capacity, answered with RESOURCE_EXHAUSTED while memory holds.

Starts `mesh serve` (a random-weight preset, --workers 0, --max-queued-requests Q), measures its
capacity with a closed loop of Q callers (`mesh loadtest --concurrency Q`), then offers ten times that
rate open-loop (`mesh loadtest --rate 10C`). Printed as JSON lines, each against its baseline from the
same run:

- capacity: completed requests/s at the admission limit (the baseline);
- overload: requests sent, completed, refused with RESOURCE_EXHAUSTED, failed otherwise; goodput
  (completed requests/s) as a ratio to the capacity; TTFT/TPOT p50 of what was served against the
  capacity run's;
- memory: the server's peak resident set during the overload against its peak during the capacity
  run, and whether it is still alive (no OOM kill).

    .venv/bin/python bench/overload.py [--preset small] [--max-queued 32] [--duration 20] [--factor 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import bench_model, emit, hardware, start_serve, stop_serve

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """The peak resident set of `pid`, sampled every 0.1 s while running."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self):
        self.peak = rss_bytes(self.pid)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def loadtest(target: str, out: Path, *args: str, nice: int = 0) -> dict:
    cmd = (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-m", "mesh_cli", "loadtest", "--target", target, "--out", str(out), "--json",
           "--no-plots", "--no-progress", "--prompt-tokens", "64", "--output-tokens", "16", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if p.returncode != 0:
        raise SystemExit(f"overload: mesh loadtest failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "bench"],
                    help="random-weight model preset (default small)")
    ap.add_argument("--max-queued", type=int, default=32, help="the server's --max-queued-requests (default 32)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    ap.add_argument("--factor", type=float, default=10.0, help="overload as a multiple of the capacity (default 10)")
    ap.add_argument("--generator-nice", type=int, default=0,
                    help="run the load generator at this niceness (e.g. 10: on a small machine the server then "
                         "keeps its share of the CPU; the offered rate may then fall short, which is reported)")
    args = ap.parse_args()
    if args.max_queued < 1 or args.duration <= 0 or args.factor <= 1:
        ap.error("--max-queued must be >= 1, --duration > 0, --factor > 1")

    model = bench_model("qwen3_moe", args.preset)
    work = Path(tempfile.mkdtemp(prefix="mesh-overload-"))
    proc, target = start_serve(work, "--model", str(model), "--workers", "0", "--dtype", "float32",
                               "--max-queued-requests", str(args.max_queued))
    try:
        emit({"bench": "overload", "hardware": hardware(), "model": str(model), "max_queued": args.max_queued})
        print(f"overload: capacity: {args.max_queued} callers for {args.duration:g}s ...", file=sys.stderr)
        with PeakRss(proc.pid) as base_mem:
            cap = loadtest(target, work / "capacity", "--concurrency", str(args.max_queued),
                           "--duration", str(args.duration))
        capacity = cap["requests"]["completed"] / cap["window_s"]
        emit({"phase": "capacity", "completed_rps": capacity, "ttft_ms_p50": cap["ttft_ms"]["p50"],
              "tpot_ms_p50": cap["tpot_ms"]["p50"], "peak_rss_mb": base_mem.peak / 2**20,
              "generator_bottleneck": cap["generator_bottleneck"]})
        rate = args.factor * capacity
        print(f"overload: {rate:.0f} req/s ({args.factor:g}x capacity) for {args.duration:g}s ...", file=sys.stderr)
        ok_before = (work / "serve.log").read_text().count("status=OK")
        t_over = time.monotonic()
        with PeakRss(proc.pid) as over_mem:
            over = loadtest(target, work / "overload", "--rate", f"{rate:.3f}", "--duration", str(args.duration),
                            "--timeout", "60", nice=args.generator_nice)
        # what the server itself completed (its access log), whether or not the generator kept up reading
        served = (work / "serve.log").read_text().count("status=OK") - ok_before
        served_rps = served / (time.monotonic() - t_over)
        q, errors = over["requests"], over.get("errors") or {}
        refused = errors.get("RESOURCE_EXHAUSTED", 0)
        goodput = q["completed"] / over["window_s"]
        emit({"phase": "overload", "offered_rps": rate, "sent_rps": q["sent"] / args.duration, "sent": q["sent"], "completed": q["completed"],
              "resource_exhausted": refused, "failed_otherwise": q["failed"] - refused,
              "goodput_rps": goodput, "goodput_vs_capacity": goodput / capacity,
              "server_completed_rps": served_rps, "server_completed_vs_capacity": served_rps / capacity,
              "ttft_ms_p50": over["ttft_ms"]["p50"], "ttft_p50_vs_capacity_run": over["ttft_ms"]["p50"] / cap["ttft_ms"]["p50"],
              "tpot_ms_p50": over["tpot_ms"]["p50"], "tpot_p50_vs_capacity_run": over["tpot_ms"]["p50"] / cap["tpot_ms"]["p50"],
              "peak_rss_mb": over_mem.peak / 2**20, "peak_rss_vs_capacity_run": over_mem.peak / max(1, base_mem.peak),
              "server_alive": proc.poll() is None, "generator_bottleneck": over["generator_bottleneck"],
              "errors": errors})
        return 0 if proc.poll() is None and q["failed"] == refused else 1
    finally:
        stop_serve(proc)


if __name__ == "__main__":
    sys.exit(main())
