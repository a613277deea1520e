"""The single-process engine against transformers' `generate`, on the `bench` preset, in one run.

Workloads:
  (a) 32 requests x 128 prompt tokens -> 64 output tokens (transformers: one batch of 32).
  (b) 256 requests, prompt lengths 16-1024, outputs 16-256 (transformers: left-padded batches of 32,
      each run to its longest requested output; only requested tokens count as output).
Also: one decode step at batch 64 against this machine's roofline (GEMM peak and memory bandwidth
measured in the same run; the peak is the faster of torch.mm and mesh's own linear kernel). Prints one
JSON object per result.

    .venv/bin/python bench/engine_vs_hf.py                 # both dtypes, both workloads
    .venv/bin/python bench/engine_vs_hf.py --quick         # (b) with 64 requests
    python3 bench/engine_vs_hf.py --device cuda            # both sides on the GPU
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from common import (bench_model, emit, gemm_peak, gemm_peaks, hardware, memory_bandwidth, median_time,
                    peak_rss_bytes, sync)

from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams


def workload_a(vocab: int):
    rng = random.Random(0)
    return [([rng.randrange(vocab) for _ in range(128)], 64) for _ in range(32)]


def workload_b(vocab: int, n: int):
    rng = random.Random(1)
    return [([rng.randrange(vocab) for _ in range(rng.randint(16, 1024))], rng.randint(16, 256))
            for _ in range(n)]


def run_engine(engine: Engine, work) -> float:
    reqs = [engine.make_request(prompt_token_ids=p, sampling=SamplingParams(max_tokens=n, temperature=0,
                                                                             ignore_eos=True))
            for p, n in work]
    t = time.perf_counter()
    outs = engine.generate(reqs)
    elapsed = time.perf_counter() - t
    assert sum(len(o.token_ids) for o in outs) == sum(n for _, n in work)
    return elapsed


def run_hf(model, work, batch: int, pad_id: int) -> float:
    dev = model.device
    sync()
    t = time.perf_counter()
    for i in range(0, len(work), batch):
        group = work[i:i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in group], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group], device=dev)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in group),
                           do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    sync()
    return time.perf_counter() - t


def decode_roofline(engine: Engine, batch: int = 64, ctx: int = 256, rounds: int = 3, device: str = "cpu") -> dict:
    """Time one decode step at `batch` sequences of `ctx` tokens; compare with max(flops/peak, bytes/bw).

    On a shared machine the GEMM peak and the memory bandwidth move from second to second (seen here:
    27-42 GB/s within a minute), so the step is timed in `rounds` rounds, each right after measuring
    the peak and the bandwidth again; the fraction reported is the median of the rounds' fractions
    (each round's own roofline over its own median step), with every round listed."""
    cfg = engine.model_config
    rng = random.Random(2)
    for _ in range(batch):
        engine.add_request(engine.make_request(
            prompt_token_ids=[rng.randrange(cfg.vocab_size) for _ in range(ctx)],
            sampling=SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.num_waiting:
        engine.step()
    per_round = []
    for r in range(rounds):
        peak, bw = gemm_peak(engine.config.torch_dtype, device=device), memory_bandwidth(device=device)
        per_round.append((median_time(engine.step, repeat=9, warmup=2 if r == 0 else 1), peak, bw))
    touched = []  # (layer, expert) pairs whose weights a step reads, per step
    for _ in range(3):
        before = engine.dispatcher.expert_load.clone()
        engine.step()
        touched.append(((engine.dispatcher.expert_load - before) > 0).sum().item())
    engine.abort_all()
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    el = torch.finfo(engine.config.torch_dtype).bits // 8
    expert_params = 3 * H * I
    dense_params = sum(t.numel() for t in _dense_tensors(engine)) - cfg.vocab_size * H  # embedding rows: gathered
    # a hybrid model's recurrent states (float32) are read and written once per step besides the KV
    bytes_moved = (dense_params + sum(touched) / len(touched) * expert_params) * el \
        + batch * ctx * cfg.kv_bytes_per_token * el + 2 * batch * cfg.state_bytes_per_sequence
    attn_flops = 4 * batch * ctx * cfg.num_heads * cfg.head_dim * cfg.num_kv_layers
    flops = 2 * batch * (dense_params + cfg.num_moe_layers * cfg.top_k * expert_params) + attn_flops
    rows = [{"step_ms": t * 1e3, "roofline_ms": max(flops / p, bytes_moved / b) * 1e3,
             "fraction": max(flops / p, bytes_moved / b) / t, "gemm_gflop_per_s": p / 1e9, "read_gbytes_per_s": b / 1e9,
             "bound": "compute" if flops / p > bytes_moved / b else "memory"} for t, p, b in per_round]
    mid = sorted(rows, key=lambda row: row["fraction"])[len(rows) // 2]
    return {"step_ms": mid["step_ms"], "roofline_ms": mid["roofline_ms"], "fraction_of_roofline": mid["fraction"],
            "bound": mid["bound"], "gflop": flops / 1e9, "mbytes": bytes_moved / 1e6, "batch": batch, "context": ctx,
            "rounds": rows}


def _dense_tensors(engine: Engine):
    w = engine.model.w
    yield w.embed
    yield w.norm
    if w.lm_head is not w.embed:
        yield w.lm_head
    for layer in w.layers:
        a, lin, moe = layer.attn, layer.linear, layer.moe
        for t in (layer.input_norm, layer.post_norm, layer.mlp_gate_up, layer.mlp_down,
                  *((a.qkv, a.o) if a is not None else ()),  # full attention
                  *((lin.in_proj, lin.conv, lin.out) if lin is not None else ()),  # Gated DeltaNet (hybrid)
                  *((moe.router, moe.shared_gate_up, moe.shared_down, moe.shared_gate) if moe is not None else ())):
            if t is not None:
                yield t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="a,b,decode")
    ap.add_argument("--quick", action="store_true", help="workload (b) with 64 requests instead of 256")
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both transformers and the engine run")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device")
    from transformers import AutoModelForCausalLM

    model_dir = bench_model(args.arch)
    emit({"bench": "engine_vs_hf", "hardware": hardware(), "model": str(model_dir)})
    bw = memory_bandwidth(device=args.device)
    emit({"roofline": "memory_read", "gbytes_per_s": bw / 1e9})
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        peaks = gemm_peaks(dtype, device=args.device)
        emit({"roofline": "gemm", "dtype": dtype_name, "gflop_per_s": max(peaks.values()) / 1e9,
              **{f"{k}_gflop_per_s": v / 1e9 for k, v in peaks.items()}})
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
        engine = Engine(model_dir, EngineConfig(dtype=dtype_name, kv_cache_memory=2 << 30, device=args.device))
        vocab = engine.model_config.vocab_size
        pad = engine.tokenizer.token_id("<|fim_pad|>") if engine.tokenizer else 0
        # warm both paths (allocator, oneDNN kernel selection) outside the timings
        warm = workload_a(vocab)[:4]
        run_engine(engine, [(p, 4) for p, _ in warm])
        run_hf(hf, [(p, 4) for p, _ in warm], 4, pad)
        for name in args.workloads.split(","):
            if name == "decode":
                emit({"workload": "decode_step", "dtype": dtype_name,
                      **decode_roofline(engine, device=args.device)})
                continue
            work = workload_a(vocab) if name == "a" else workload_b(vocab, 64 if args.quick else 256)
            out_tokens = sum(n for _, n in work)
            t_engine = run_engine(engine, work)
            t_hf = run_hf(hf, work, 32, pad)
            emit({"workload": name, "dtype": dtype_name, "device": args.device, "requests": len(work),
                  "output_tokens": out_tokens, "engine_tok_s": out_tokens / t_engine, "hf_tok_s": out_tokens / t_hf,
                  "speedup": t_hf / t_engine, "engine_s": t_engine, "hf_s": t_hf,
                  "preemptions": engine.scheduler.num_preemptions})
        del hf, engine
    emit({"peak_rss_mb": peak_rss_bytes() / 2**20})
    return 0


if __name__ == "__main__":
    sys.exit(main())
