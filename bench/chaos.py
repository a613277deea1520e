"""Chaos: expert workers SIGKILLed under load, against a real `mesh serve --workers 3 --redundant-experts 2`.

Starts the server (a random-weight preset, or --model), runs a closed loop of greedy streams over
gRPC, and every --kill-every seconds SIGKILLs one expert worker (a different rank in turn, its pid
from the Admin API) until --duration is over. Every completed request's tokens are compared with the
same prompt's tokens from before the first kill (greedy: they must be identical). Printed as JSON
lines, each against its baseline from the same run:

- requests sent / completed / failed, and how many completed with tokens different from the baseline;
- per phase (steady before the first kill, then after each kill): TPOT p50/p99 (gap between two tokens
  of one stream), as a ratio to the steady phase's;
- per kill: seconds from the kill until the Admin API shows the pool re-formed (`reformed_s`), until
  it is back to its size with every worker joined (`restored_s`), and the longest time no stream
  received a token (`stall_s`), against the steady phase's longest gap.

    .venv/bin/python bench/chaos.py [--duration 180] [--kill-every 30] [--streams 8] [--preset small]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import bench_model, emit, hardware, pct, start_serve, stop_serve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router_service.client import MeshClient, MeshError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of killing after the steady phase (default 180)")
    ap.add_argument("--kill-every", type=float, default=30.0, help="seconds between two kills (default 30)")
    ap.add_argument("--steady", type=float, default=20.0, help="seconds of load before the first kill (default 20)")
    ap.add_argument("--workers", type=int, default=3, help="expert workers (default 3)")
    ap.add_argument("--redundant-experts", type=int, default=2, help="replica slots (default 2)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent greedy streams (default 8)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "bench"],
                    help="random-weight model preset (default small: 16 experts)")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of --preset")
    args = ap.parse_args()
    if args.kill_every <= 0 or args.duration <= 0 or args.streams < 1:
        ap.error("--kill-every, --duration and --streams must be positive")

    model = Path(args.model) if args.model else bench_model("qwen3_moe", args.preset)
    token = "chaos-admin"
    work = Path(tempfile.mkdtemp(prefix="mesh-chaos-"))
    print(f"chaos: starting mesh serve --workers {args.workers} --redundant-experts {args.redundant_experts} "
          f"on {model} (log {work / 'serve.log'})", file=sys.stderr)
    (work / "token").write_text(token + "\n")
    proc, target = start_serve(work, "--model", str(model), "--workers", str(args.workers), "--redundant-experts",
                               str(args.redundant_experts), "--dtype", "float32", "--admin-token-file",
                               str(work / "token"), "--grace-period", "2")
    MeshClient(target).wait_ready(timeout=300)
    admin = MeshClient(target, timeout=60, admin_token=token)
    emit({"bench": "chaos", "hardware": hardware(), "model": str(model), "workers": args.workers,
          "redundant_experts": args.redundant_experts, "streams": args.streams})

    import random
    rng = random.Random(0)
    prompts = [[rng.randrange(100) for _ in range(rng.randint(8, 64))] for _ in range(args.streams)]
    lock = threading.Lock()
    baseline: dict[int, list[int]] = {}
    sent = completed = failed = mismatched = 0
    gaps: list[tuple[float, float]] = []  # (time of a token, gap since the stream's previous token)
    arrivals: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def stream(i: int) -> None:
        nonlocal sent, completed, failed, mismatched
        c = MeshClient(target, timeout=300)
        while not stop.is_set():
            with lock:
                sent += 1
            tokens, last = [], None
            try:
                for out in c.generate(prompt_token_ids=prompts[i], max_tokens=args.max_tokens, temperature=0,
                                      ignore_eos=True):
                    now = time.monotonic()
                    tokens += out.new_token_ids
                    with lock:
                        arrivals.append(now)
                        if last is not None:
                            gaps.append((now, now - last))
                    last = now
            except MeshError as e:
                with lock:
                    failed += 1
                    errors.append(str(e))
                continue
            with lock:
                completed += 1
                ref = baseline.setdefault(i, tokens)
                mismatched += tokens != ref
        c.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(args.streams)]
    for t in threads:
        t.start()
    t_start = time.monotonic()
    time.sleep(args.steady)
    kills = []
    try:
        t_end = time.monotonic() + args.duration
        k = 0
        while time.monotonic() < t_end:
            pool = admin.get_pool()
            workers = [w for w in pool["workers"] if w["state"] == "joined"]
            victim = workers[k % len(workers)]
            t_kill = time.monotonic()
            os.kill(int(victim["pid"]), signal.SIGKILL)
            print(f"chaos: kill {k + 1}: SIGKILL worker {victim['rank']} (pid {victim['pid']})", file=sys.stderr)
            rec = {"kill": k + 1, "rank": victim["rank"], "t": t_kill - t_start}
            recoveries = pool.get("recoveries", 0)
            while time.monotonic() < t_kill + 120:
                p = admin.get_pool()
                if "reformed_s" not in rec and p.get("recoveries", 0) > recoveries:
                    rec["reformed_s"] = time.monotonic() - t_kill
                if "reformed_s" in rec and p["num_workers"] == args.workers and \
                        all(w["state"] == "joined" for w in p["workers"]):
                    rec["restored_s"] = time.monotonic() - t_kill
                    break
                time.sleep(0.1)
            kills.append(rec)
            k += 1
            time.sleep(max(0.0, t_kill + args.kill_every - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(300)
        admin.close()
        stop_serve(proc)

    # phases: steady, then after each kill
    bounds = [t_start] + [t_start + r["t"] for r in kills] + [float("inf")]
    names = ["steady"] + [f"after kill {r['kill']}" for r in kills]
    steady = [g for t, g in gaps if bounds[0] <= t < bounds[1]]
    base50, base99 = pct(steady, 50), pct(steady, 99)
    arrivals.sort()
    steady_max = max((b - a for a, b in zip(arrivals, arrivals[1:]) if b < bounds[1]), default=0.0)
    for name, lo, hi in zip(names, bounds, bounds[1:]):
        phase = [g for t, g in gaps if lo <= t < hi]
        if phase:
            emit({"phase": name, "tokens": len(phase), "tpot_p50_ms": pct(phase, 50) * 1e3,
                  "tpot_p99_ms": pct(phase, 99) * 1e3, "p50_vs_steady": pct(phase, 50) / base50,
                  "p99_vs_steady": pct(phase, 99) / base99})
    for r in kills:
        t_kill = t_start + r["t"]
        window = [a for a in arrivals if t_kill - 1 <= a <= t_kill + 30]
        r["stall_s"] = max((b - a for a, b in zip(window, window[1:])), default=0.0)
        r["stall_vs_steady_max_gap"] = r["stall_s"] / steady_max if steady_max else None
        emit(r)
    emit({"requests_sent": sent, "completed": completed, "failed": failed, "tokens_differ": mismatched,
          "kills": len(kills), "max_reformed_s": max((r.get("reformed_s", float("inf")) for r in kills), default=None),
          "first_errors": errors[:3]})
    return 0 if failed == 0 and mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
