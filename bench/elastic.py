"""Live rebalancing of an expert pool while streams decode: what a placement change costs.

One run: a pool of W Ray expert workers (default 3, on the `small` preset's 16 experts: 6 slots each,
two of them replicas), 8 greedy streams decoding in a closed loop, and three rebalances to Zipf-skewed
loads (each a different hot set), then one that adds a replica slot per worker and one that removes
it. Printed, each against its baseline from the same run:

- TPOT (decode step time; every stream gets one token per step) p50/p99 during the rebalances, the scale-up and the scale-down
  (decision to switch, plus the step after) against the steady phase before them, and the longest
  step against the steady median (stall);
- decision to serving on the new placement (seconds), bytes the workers loaded, experts moved;
- max/mean rows per worker, worst layer, of the load each change balances (a Zipf load for the first
  three, the router's own load over the window for the slot changes) on the placement before and
  after it.

Then the pool grows by one worker and shrinks back (phases scale-up, scale-down), each timed the same.

    .venv/bin/python bench/elastic.py [--workers 3] [--preset small] [--streams 8] [--zipf 1.2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from common import bench_model, emit, hardware, pct

from expert_workers.pool import ExpertPool
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams


CHANGES = ("rebalance", "scale-up", "scale-down")


def zipf_load(L: int, E: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([base[torch.randperm(E, generator=g)] for _ in range(L)])  # [L, E]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=3, help="expert workers (default 3)")
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "bench"],
                    help="random-weight model preset (default small: 16 experts, 4 layers)")
    ap.add_argument("--streams", type=int, default=8, help="greedy streams kept running (default 8)")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the skewed loads (default 1.2)")
    ap.add_argument("--steady-steps", type=int, default=60, help="steps run before the first change (default 60)")
    ap.add_argument("--warmup-steps", type=int, default=20, help="first steps left out of the figures (default 20)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.workers < 1 or args.streams < 1:
        ap.error("--workers and --streams must be at least 1")

    model = bench_model("qwen3_moe", args.preset)
    pool = ExpertPool(str(model), args.dtype, args.workers)
    print(f"starting {args.workers} expert workers on {model.name} ...", file=sys.stderr)
    dispatcher = pool.start()
    engine = Engine(model, EngineConfig(dtype=args.dtype, max_num_seqs=max(8, args.streams)), dispatcher=dispatcher)
    L, E = dispatcher.L, dispatcher.placement.num_experts
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    sp = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    phase = ["steady"]
    steps: list[tuple[str, float, int]] = []  # (phase, seconds, decode tokens)
    stop = threading.Event()

    def top_up():
        while engine.num_running + engine.num_waiting < args.streams:
            prompt = torch.randint(0, vocab, (int(torch.randint(8, 64, (1,), generator=g)),), generator=g).tolist()
            engine.add_request(engine.make_request(prompt_token_ids=prompt, sampling=sp))

    records: list[dict] = []
    errors: list[BaseException] = []

    def operator():
        try:
            while len(steps) < args.steady_steps:
                time.sleep(0.05)
            plans = [dict(load=zipf_load(L, E, args.zipf, seed)) for seed in (1, 2, 3)]
            plans += [dict(slots_per_rank=pool.placement.slots_per_rank + 1),
                      dict(slots_per_rank=pool.placement.slots_per_rank)]
            for i, kw in enumerate(plans):
                # the Zipf loads for the first three; the router's own load (the window) for the slot changes
                load = kw.get("load", pool.window_load())
                before = pool.imbalance(load)
                phase[0] = "rebalance"
                rec = pool.rebalance(**{**kw, "load": load})
                phase[0] = "after"
                rec.update(load_before=before, load_after=pool.imbalance(load))
                records.append(rec)
                time.sleep(1.0)  # steady steps on the new placement
            for name, w in (("scale-up", args.workers + 1), ("scale-down", args.workers)):
                load = pool.window_load()
                before = pool.imbalance(load)
                phase[0] = name
                rec = pool.scale(w, load=load)
                phase[0] = "after"
                rec.update(load_before=before, load_after=pool.imbalance(load), phase=name)
                records.append(rec)
                time.sleep(1.0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    prev = "steady"
    while not stop.is_set():
        top_up()
        p = phase[0]
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        decode = sum(1 for o in outs if o.new_token_ids) if outs else 0
        # a pure decode step (every running sequence one token, nothing prefilled): the like-for-like
        # unit a stall is measured in; refill steps also prefill new prompts and take longer anyway
        recent = engine.observer.work.recent  # [step, sequences, decode tokens, prefill tokens, ...]
        pure = bool(outs) and bool(recent) and recent[-1][3] == 0
        # a step counts for the phase it started in; a change's phase also takes the one step after it
        steps.append((p if p in CHANGES else prev if prev in CHANGES else "steady", dt, decode if pure else -1))
        prev = p
    t.join()
    pool.shutdown()
    if errors:
        raise errors[0]

    # steady: every step outside a change (before, between and after them), past the first warm-up
    # steps; both phases hold the same mix of decode steps and refill prefills
    measured = steps[args.warmup_steps:]
    steady = [s for p, s, n in measured if p == "steady"]
    med, p99 = statistics.median(steady), pct(steady, 99)
    steady_decode = [s for p, s, n in measured if p == "steady" and n > 0]
    dmed = statistics.median(steady_decode)
    hw = hardware()
    print(f"\n{hw.get('cpu', '')}: {args.preset} preset, {E} experts on {args.workers} workers, {args.streams} streams")
    print(f"TPOT steady      p50 {med * 1e3:7.1f} ms  p99 {p99 * 1e3:7.1f} ms  ({len(steady)} steps); longest step "
          f"{max(steady) / med:.2f}x the median; pure decode steps: median {dmed * 1e3:.1f} ms, longest "
          f"{max(steady_decode) / dmed:.2f}x")
    phases = {}
    for name in CHANGES:
        xs = [s for p, s, n in measured if p == name]
        if not xs:
            continue
        dx = [s for p, s, n in measured if p == name and n > 0]
        phases[name] = {"p50_s": statistics.median(xs), "p99_s": pct(xs, 99), "max_s": max(xs), "steps": len(xs),
                        "p99_ratio": pct(xs, 99) / p99, "max_stall_ratio": max(xs) / med,
                        "decode_max_stall_ratio": max(dx) / dmed if dx else None}
        print(f"TPOT {name:<11} p50 {statistics.median(xs) * 1e3:7.1f} ms  p99 {pct(xs, 99) * 1e3:7.1f} ms  "
              f"({len(xs)} steps)  p99 {pct(xs, 99) / p99:.2f}x steady; longest step {max(xs) * 1e3:.1f} ms = "
              f"{max(xs) / med:.2f}x the steady median" +
              (f"; longest pure decode step {max(dx) / dmed:.2f}x the steady one's median" if dx else ""))
    for i, r in enumerate(records):
        what = (f"Zipf load {i + 1}" if i < 3 else f"{r['phase']} to {r['workers_after']} workers" if "phase" in r
                else f"router's load, {r['slots_per_rank']} slots per worker")
        print(f"change {i + 1} ({what}): decision->serving {r['decision_to_serving_s']:.2f}s, "
              f"{r['loaded_bytes'] / 1e6:.1f} MB loaded, {r['moved_experts']} (layer, expert) moved; "
              f"max/mean rows per worker {r['load_before']:.2f} -> {r['load_after']:.2f}")
    emit({"bench": "elastic", "preset": args.preset, "workers": args.workers, "streams": args.streams,
          "tpot_steady_p50_s": med, "tpot_steady_p99_s": p99, "steady_max_stall_ratio": max(steady) / med,
          "steady_decode_p50_s": dmed, "steady_decode_max_stall_ratio": max(steady_decode) / dmed, "phases": phases,
          "changes": [{k: r[k] for k in ("decision_to_serving_s", "loaded_bytes", "moved_experts",
                                         "load_before", "load_after", "slots_per_rank")} for r in records],
          **hw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
