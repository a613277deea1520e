"""The mesh (gateway + Ray expert workers over gloo all-to-all) against the single-process engine.

Same model (`bench` preset), same workload, one run: for 1, 2 and 4 expert workers and batches of 64
and 256 requests, print output tokens/s of both and their ratio, per-layer dispatch+combine time,
bytes moved per step, and the transport-only comparison: dispatch+combine with the experts echoing
rows (no compute) against a bare all_to_all_single exchange of the same rows among the same ranks.

    .venv/bin/python bench/mesh_vs_local.py [--workers 1,2,4] [--batches 64,256] [--dtype bfloat16]
        [--gateway-threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from common import bare_exchange_seconds, bench_model, emit, hardware, peak_rss_bytes

from expert_workers.pool import ExpertPool
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.parallel.collective import ECHO
from mesh.types import SamplingParams


def workload(batch: int, vocab: int, prompt: int, output: int):
    rng = random.Random(batch)
    return [[rng.randrange(vocab) for _ in range(prompt)] for _ in range(batch)], output


def run(engine: Engine, prompts, output: int) -> float:
    sp = SamplingParams(max_tokens=output, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    engine.generate([engine.make_request(prompt_token_ids=p, sampling=sp) for p in prompts])
    return len(prompts) * output / (time.perf_counter() - t)


def decode_steps(engine: Engine, prompts, steps: int) -> None:
    """Fill the engine with `prompts` and run until every one is decoding, then `steps` more steps."""
    sp = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for p in prompts:
        engine.add_request(engine.make_request(prompt_token_ids=p, sampling=sp))
    while engine.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(steps):
        engine.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--gateway-threads", type=int, default=None,
                    help="torch threads of the gateway (and of the single-process baseline); default: torch's. "
                         "1 with --workers 1 gives each process a core of its own on a 2-core machine")
    args = ap.parse_args()
    if args.gateway_threads is not None:
        torch.set_num_threads(args.gateway_threads)
    import ray

    model_dir = bench_model()
    emit({"bench": "mesh_vs_local", "hardware": hardware(), "model": str(model_dir), "dtype": args.dtype})
    cfg = EngineConfig(dtype=args.dtype, kv_cache_memory=2 << 30)
    batches = [int(b) for b in args.batches.split(",")]
    local = Engine(model_dir, cfg)
    vocab = local.model_config.vocab_size
    run(local, workload(8, vocab, 16, 4)[0], 4)  # warm-up
    local_tps = {b: run(local, *workload(b, vocab, args.prompt_tokens, args.output_tokens)) for b in batches}
    local_step = {}
    for b in batches:  # compute alone: the single-process decode step at this batch
        decode_steps(local, workload(b, vocab, args.prompt_tokens, 1)[0], 2)
        t0 = time.perf_counter()
        decode_steps(local, [], 5)
        local_step[b] = (time.perf_counter() - t0) / 5
        local.abort_all()
    del local
    ray.init(include_dashboard=False, num_cpus=8, log_to_driver=False)
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            pool = ExpertPool(str(model_dir), args.dtype, w, threads_per_worker=1)
            try:
                disp = pool.start()
                mesh = Engine(model_dir, cfg, dispatcher=disp)
                run(mesh, workload(8, vocab, 16, 4)[0], 4)
                for b in batches:
                    prompts, out = workload(b, vocab, args.prompt_tokens, args.output_tokens)
                    tps = run(mesh, prompts, out)
                    # decode-only counters at this batch
                    decode_steps(mesh, prompts, 2)
                    disp.reset_counters()
                    s0, sent0, recv0 = disp.steps, disp.total_bytes_sent, disp.total_bytes_received
                    t0 = time.perf_counter()
                    decode_steps(mesh, [], 5)
                    step_s = (time.perf_counter() - t0) / 5  # with the engine's default micro-batches
                    default_mb, mesh.runner.micro_batches = mesh.runner.micro_batches, 2  # two in flight
                    t0 = time.perf_counter()
                    decode_steps(mesh, [], 5)
                    step_mb2_s = (time.perf_counter() - t0) / 5
                    mesh.runner.micro_batches = 1  # the same steps without overlap
                    t0 = time.perf_counter()
                    decode_steps(mesh, [], 5)
                    step_serial_s = (time.perf_counter() - t0) / 5
                    mesh.runner.micro_batches = default_mb
                    n = disp.steps - s0
                    layer_ms = statistics.mean(disp.layer_seconds) / n * 1e3
                    bytes_step = (disp.total_bytes_sent - sent0 + disp.total_bytes_received - recv0) / n
                    # transport alone: experts echo rows, then the same rows with raw collectives only
                    disp.step_flags = ECHO
                    disp.reset_counters()
                    decode_steps(mesh, [], 5)
                    echo_ms = statistics.mean(disp.layer_seconds) / 5 * 1e3
                    disp.step_flags = 0
                    bare_ms = bare_exchange_seconds(disp, 5) * 1e3  # the rows the echo steps moved
                    mesh.abort_all()
                    emit({"workers": w, "batch": b, "mesh_tok_s": tps, "local_tok_s": local_tps[b],
                          "mesh_over_local": tps / local_tps[b], "decode_step_ms": step_s * 1e3,
                          "dispatch_combine_ms_per_layer": layer_ms, "bytes_per_step": bytes_step,
                          "transport_only_ms_per_layer": echo_ms, "bare_all_to_all_ms_per_layer": bare_ms,
                          "transport_over_bare": echo_ms / bare_ms,
                          "decode_step_one_micro_batch_ms": step_serial_s * 1e3,
                          "decode_step_two_micro_batches_ms": step_mb2_s * 1e3,
                          "compute_step_ms": local_step[b] * 1e3,
                          "transport_step_ms": bare_ms * disp.L,
                          "overlap_ratio": step_mb2_s * 1e3 / max(local_step[b] * 1e3, bare_ms * disp.L)})
                del mesh
            finally:
                pool.shutdown()
    finally:
        ray.shutdown()
    emit({"peak_rss_mb": peak_rss_bytes() / 2**20})
    return 0


if __name__ == "__main__":
    sys.exit(main())
