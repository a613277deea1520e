"""Live rebalancing of an expert pool while streams decode: what a placement change costs.

One run: a pool of W Ray expert workers (default 3, on the `small` preset's 16 experts: 6 slots each,
two of them replicas), 8 greedy streams decoding in a closed loop, and three rebalances to Zipf-skewed
loads (each a different hot set), then one that adds a replica slot per worker and one that removes
it. Printed, each against its baseline from the same run:

- TPOT (decode step time; every stream gets one token per step) p50/p99 during the rebalances
  (decision to switch, plus the step after) against the steady phase before them, and the longest
  step against the steady median (stall);
- decision to serving on the new placement (seconds), bytes the workers loaded, experts moved;
- max/mean rows per worker, worst layer, of the load each change balances (a Zipf load for the first
  three, the router's own load over the window for the slot changes) on the placement before and
  after it.

Scale-up and scale-down phases are not measured: changing the worker count at runtime is not built.

    .venv/bin/python bench/elastic.py [--workers 3] [--preset small] [--streams 8] [--zipf 1.2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from common import bench_model, emit, hardware

from expert_workers.pool import ExpertPool
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams


def zipf_load(L: int, E: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([base[torch.randperm(E, generator=g)] for _ in range(L)])  # [L, E]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


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
        # a step counts for the phase it started in; a change's phase also takes the one step after it
        steps.append(("rebalance" if p == "rebalance" or prev == "rebalance" else "steady", dt, decode))
        prev = p
    t.join()
    pool.shutdown()
    if errors:
        raise errors[0]

    # steady: every step outside a change (before, between and after them), past the first warm-up
    # steps; both phases hold the same mix of decode steps and refill prefills
    measured = steps[args.warmup_steps:]
    steady = [s for p, s, n in measured if p != "rebalance"]
    during = [s for p, s, n in measured if p == "rebalance"]
    med = statistics.median(steady)
    hw = hardware()
    print(f"\n{hw.get('cpu', '')}: {args.preset} preset, {E} experts on {args.workers} workers, {args.streams} streams")
    print(f"TPOT steady   p50 {med * 1e3:7.1f} ms  p99 {pct(steady, 99) * 1e3:7.1f} ms  ({len(steady)} steps)")
    print(f"TPOT rebalance p50 {statistics.median(during) * 1e3:7.1f} ms  p99 {pct(during, 99) * 1e3:7.1f} ms  "
          f"({len(during)} steps)  p99 ratio {pct(during, 99) / pct(steady, 99):.2f}x steady")
    print(f"longest step during changes {max(during) * 1e3:.1f} ms = {max(during) / med:.2f}x the steady median")
    for i, r in enumerate(records):
        what = f"Zipf load {i + 1}" if i < 3 else f"router's load, {r['slots_per_rank']} slots per worker"
        print(f"change {i + 1} ({what}): decision->serving {r['decision_to_serving_s']:.2f}s, "
              f"{r['loaded_bytes'] / 1e6:.1f} MB loaded, {r['moved_experts']} (layer, expert) moved; "
              f"max/mean rows per worker {r['load_before']:.2f} -> {r['load_after']:.2f}")
    print("scale-up / scale-down phases: not measured (runtime worker-count changes are not built)")
    emit({"bench": "elastic", "preset": args.preset, "workers": args.workers, "streams": args.streams,
          "tpot_steady_p50_s": med, "tpot_steady_p99_s": pct(steady, 99),
          "tpot_rebalance_p50_s": statistics.median(during), "tpot_rebalance_p99_s": pct(during, 99),
          "p99_ratio": pct(during, 99) / pct(steady, 99), "max_stall_ratio": max(during) / med,
          "changes": [{k: r[k] for k in ("decision_to_serving_s", "loaded_bytes", "moved_experts",
                                         "load_before", "load_after", "slots_per_rank")} for r in records],
          **hw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
