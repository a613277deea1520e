"""Time (and optionally profile) one engine decode step and one prefill step on the `bench` preset.

    .venv/bin/python bench/step_profile.py --dtype bfloat16 --batch 64 --ctx 256 [--profile] [--device cuda]
Prints one JSON object per measurement: median ms of `--repeat` steps after warmup.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from common import bench_model, emit, median_time, sync

from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams


def fill(engine: Engine, batch: int, ctx: int, seed: int = 2) -> None:
    """Add `batch` requests of `ctx` prompt tokens and run their prefill to completion."""
    rng = random.Random(seed)
    for _ in range(batch):
        engine.add_request(engine.make_request(
            prompt_token_ids=[rng.randrange(engine.model_config.vocab_size) for _ in range(ctx)],
            sampling=SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)))
    while engine.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                    for s in engine.scheduler.running):
        engine.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    engine = Engine(bench_model(), EngineConfig(dtype=args.dtype, kv_cache_memory=2 << 30, device=args.device))
    fill(engine, args.batch, args.ctx)
    t = median_time(engine.step, repeat=args.repeat, warmup=2)
    emit({"step": "decode", "dtype": args.dtype, "device": args.device, "batch": args.batch, "ctx": args.ctx,
          "ms": t * 1e3})
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        cuda = args.device.startswith("cuda")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                engine.step()
            sync()
        avg = prof.key_averages()
        print(avg.table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
        if cuda:
            print(avg.table(sort_by="self_device_time_total", row_limit=20), file=sys.stderr)
    engine.abort_all()
    # one full prefill step: 16 prompts x 128 tokens = 2048 tokens (the per-step token budget)
    rng = random.Random(3)

    def prefill():
        for _ in range(16):
            engine.add_request(engine.make_request(
                prompt_token_ids=[rng.randrange(engine.model_config.vocab_size) for _ in range(128)],
                sampling=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
        engine.step()
        engine.abort_all()
    t = median_time(prefill, repeat=max(3, args.repeat // 2), warmup=1)
    emit({"step": "prefill", "dtype": args.dtype, "tokens": 2048, "ms": t * 1e3, "tok_s": 2048 / t})
    return 0


if __name__ == "__main__":
    sys.exit(main())
