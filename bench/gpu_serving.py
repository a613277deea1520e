"""The engine on one GPU at a real model's shape, against the HBM floor and transformers, in one run.

    python bench/gpu_serving.py [--preset coder-30b-a3b] [--batches 1,16,64,256] [--ctx 512] [--no-hf]

Random bf16 weights made on the device (`--load-format dummy`) for the preset's config.json. Prints
JSON lines, each with its baseline from the same run:
- `copy`: device-to-device copy rate (bytes read + written per second): the HBM ceiling used below.
- `decode`: engine step at each batch after prompts of --ctx tokens (median of --steps steps), the GPU
  time of the graph replay, host seconds until the replay is launched, kernels and graph launches per
  step (profiler), and the HBM floor: the bytes a step must read (dense weights, the experts its
  batch touches with uniform routing, the KV of every sequence) over the copy rate.
- `prefill`: one engine step that prefills --prefill-seqs prompts of --prefill-len tokens each from an
  empty cache (median of 3 after one warm-up of the same shape): what `mesh plan --gpu-profile`
  fits its prefill cost to.
- `moe_kernel`: one MoE layer's experts through the Triton kernels and through torch's grouped_mm.
- `mixed`: --mixed requests end to end (prompts 64-1024 tokens, outputs 32-256), output tokens/s.
- `engine_fixed` and `hf_generate`: the same fixed workload (128-token prompts, 32 new tokens, batch 1
  and 64) through the engine and through transformers' `generate` on the same model shape; ratios.
Ends within about 6 minutes on an H200.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from common import ROOT, emit

from mesh.config import EngineConfig, ModelConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams


def model_dir(preset: str, layers: int = 0) -> Path:
    """The preset's config-only directory; with `layers`, a copy cut to its first `layers` layers (the
    hybrid Coder-Next at 24 of its 48 layers fits one H200 in bf16)."""
    from mesh.presets import REAL_PRESET_ARCH, init_model
    out = ROOT / "bench" / "out" / preset
    if not (out / "config.json").is_file():
        init_model(REAL_PRESET_ARCH[preset], preset, out, dtype="bfloat16", config_only=True,
                   progress=lambda s: print(s, file=sys.stderr))
    if not layers:
        return out
    cut = ROOT / "bench" / "out" / f"{preset}-{layers}l"
    cut.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    (cut / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(out / name, cut / name)
    return cut


def copy_rate(nbytes: int = 4 << 30) -> float:
    """Bytes moved (read + written) per second by a device-to-device copy (median of 9)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(9):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (nbytes // 2) * 2 / statistics.median(times)


def step_bytes(cfg: ModelConfig, batch: int, ctx: int, elem: int = 2) -> int:
    """Bytes a decode step must read: dense weights, the experts `batch` tokens touch (uniform
    routing: E * (1 - (1 - k/E)^batch) per layer), and the KV of `batch` sequences of `ctx` tokens."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
    router = cfg.num_experts * h
    dense = cfg.num_layers * (attn + router + 2 * h) + cfg.vocab_size * h + batch * h
    e, k = cfg.num_experts, cfg.top_k
    touched = e * (1 - (1 - k / e) ** batch)
    experts = cfg.num_moe_layers * touched * 3 * h * cfg.moe_intermediate_size
    kv = batch * ctx * cfg.kv_bytes_per_token
    return int((dense + experts) * elem + kv * elem)


def fill(engine: Engine, batch: int, ctx: int, max_tokens: int, rng: random.Random) -> None:
    """Add `batch` requests of `ctx` random prompt tokens; step until every prompt is computed."""
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        engine.add_request(engine.make_request(
            prompt_token_ids=[rng.randrange(vocab) for _ in range(ctx)],
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)))
    while engine.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()


def count_launches(engine: Engine) -> dict:
    """Kernel launches and graph launches of one engine step (profiler over the host API calls)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    kernels = sum(1 for n in names if n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                            "cudaLaunchKernelExC"))
    return {"kernel_launches": kernels, "graph_launches": sum(1 for n in names if n == "cudaGraphLaunch")}


def decode_sweep(engine: Engine, cfg: ModelConfig, batches: list[int], ctx: int, steps: int, bw: float) -> dict:
    rng = random.Random(0)
    graphs = engine.runner.graphs
    results = {}
    for b in batches:
        t0 = time.perf_counter()
        fill(engine, b, ctx, max_tokens=steps + 8, rng=rng)
        for _ in range(2):
            engine.step()
        walls, hosts, gpus = [], [], []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            start.record()
            engine.step()  # samples: the tokens reach the host, so the step has finished
            end.record()
            walls.append(time.perf_counter() - t)
            end.synchronize()
            gpus.append(start.elapsed_time(end) / 1e3)
            hosts.append(graphs.last_host_seconds if graphs is not None else float("nan"))
        launches = count_launches(engine)
        floor = step_bytes(cfg, b, ctx + 2 + steps) / bw
        ms = statistics.median(walls) * 1e3
        rec = {"bench": "decode", "batch": b, "ctx": ctx, "step_ms": round(ms, 3),
               "step_gpu_ms": round(statistics.median(gpus) * 1e3, 3),
               "host_ms_to_launch": round(statistics.median(hosts) * 1e3, 3),
               "tok_s": round(b / (ms / 1e3), 1), "hbm_floor_ms": round(floor * 1e3, 3),
               "floor_over_step": round(floor * 1e3 / ms, 3), **launches,
               "graph": graphs is not None and graphs.size_for(b) is not None,
               "fill_s": round(time.perf_counter() - t0 - ms / 1e3 * (steps + 2), 1)}
        emit(rec)
        results[b] = rec
        engine.abort_all()
    return results


def prefill_sweep(engine: Engine, shapes: list[tuple[int, int]]) -> None:
    """One step prefilling `seqs` fresh prompts of `length` tokens, for each (seqs, length): step time."""
    rng = random.Random(3)
    vocab = engine.model_config.vocab_size
    for seqs, length in shapes:
        times = []
        for rep in range(4):  # the first compiles this shape's kernels: not timed
            for _ in range(seqs):
                engine.add_request(engine.make_request(
                    prompt_token_ids=[rng.randrange(vocab) for _ in range(length)],
                    sampling=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.step()  # samples the first tokens: the step has finished on the device
            if rep:
                times.append(time.perf_counter() - t)
            engine.abort_all()
        emit({"bench": "prefill", "seqs": seqs, "tokens": seqs * length, "ctx": 0,
              "step_ms": round(statistics.median(times) * 1e3, 3)})


def moe_kernels(cfg: ModelConfig, tokens: list[int]) -> None:
    """One layer's experts at the model's shape: the Triton kernels vs torch's grouped_mm (graphs)."""
    from mesh.model.cuda import fused_moe
    e, h, i, k = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.top_k
    w1 = torch.empty(e, 2 * i, h, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    w2 = torch.empty(e, h, i, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    for t in tokens:
        x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
        w = torch.softmax(torch.randn(t, k, device="cuda"), -1).to(torch.bfloat16)
        rec = {"bench": "moe_kernel", "tokens": t, "experts": e, "top_k": k}
        for name, fn in (("triton", fused_moe.fused_experts), ("grouped_mm", fused_moe.grouped_mm_experts)):
            try:
                fn(x, w1, w2, ids, w)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(x, w1, w2, ids, w)
                times = []
                for _ in range(20):
                    s, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    en.record()
                    en.synchronize()
                    times.append(s.elapsed_time(en))
                rec[f"{name}_us"] = round(statistics.median(times) * 1e3, 1)
            except Exception as ex:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
                rec[f"{name}_error"] = f"{type(ex).__name__}: {ex}"[:200]
        if "triton_us" in rec and "grouped_mm_us" in rec:
            rec["triton_speedup"] = round(rec["grouped_mm_us"] / rec["triton_us"], 2)
        emit(rec)
    del w1, w2


def mixed(engine: Engine, n: int) -> dict:
    """n requests at once: prompts 64-1024 tokens, outputs 32-256 tokens (seeded)."""
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    reqs = [engine.make_request(prompt_token_ids=[rng.randrange(vocab) for _ in range(rng.randint(64, 1024))],
                                sampling=SamplingParams(max_tokens=rng.randint(32, 256), temperature=0,
                                                        ignore_eos=True)) for _ in range(n)]
    graph_steps = engine.runner.graph_steps
    steps0 = engine.num_steps
    t = time.perf_counter()
    out = engine.generate(reqs)
    wall = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in out)
    rec = {"bench": "mixed", "requests": n, "output_tokens": tokens,
           "prompt_tokens": sum(len(r.prompt_token_ids) for r in reqs), "wall_s": round(wall, 2),
           "output_tok_s": round(tokens / wall, 1), "steps": engine.num_steps - steps0,
           "graph_steps": engine.runner.graph_steps - graph_steps}
    emit(rec)
    return rec


def fixed(engine: Engine, batch: int, prompt: int = 128, new: int = 32) -> float:
    """The transformers baseline's workload through the engine: output tokens/s."""
    rng = random.Random(5)
    vocab = engine.model_config.vocab_size
    reqs = [engine.make_request(prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt)],
                                sampling=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
            for _ in range(batch)]
    t = time.perf_counter()
    engine.generate(reqs)
    return batch * new / (time.perf_counter() - t)


def hf_generate(path: Path, batches: list[int], prompt: int = 128, new: int = 32) -> dict:
    """transformers' generate on the same config (random bf16 weights on the GPU): output tokens/s."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    build = time.perf_counter() - t0
    out = {}
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), device="cuda")
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        out[b] = b * new / (time.perf_counter() - t)
        emit({"bench": "hf_generate", "transformers": transformers.__version__, "batch": b, "prompt": prompt,
              "new_tokens": new, "output_tok_s": round(out[b], 1), "build_s": round(build, 1)})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="coder-30b-a3b",
                    help="a config-only preset: coder-30b-a3b (default), coder-next, coder-480b-a35b")
    ap.add_argument("--layers", type=int, default=0,
                    help="keep only the first N layers (e.g. 24 for coder-next on one H200; default: all)")
    ap.add_argument("--batches", default="1,16,64,256", help="decode batch sizes (default 1,16,64,256)")
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens before the decode steps (default 512)")
    ap.add_argument("--steps", type=int, default=9, help="decode steps timed per batch (median; default 9)")
    ap.add_argument("--mixed", type=int, default=256, help="requests in the end-to-end run (default 256; 0: skip)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--kv-cache-memory", default="24G", help="KV pool size (default 24G)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (to measure what they save)")
    ap.add_argument("--prefill", default="1x512,1x2048,2x2048,4x2048",
                    help="prefill steps timed, SEQSxLENGTH each (default 1x512,1x2048,2x2048,4x2048; '' skips)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_serving.py needs a CUDA device", file=sys.stderr)
        return 2
    from mesh.config import parse_size
    t_all = time.perf_counter()
    path = model_dir(args.preset, args.layers)
    cfg = ModelConfig.from_dir(path)
    bw = copy_rate()
    emit({"bench": "copy", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
          "tb_s": round(bw / 1e12, 3)})
    # transformers first: its model and the engine's do not both fit beside a KV pool
    hf = hf_generate(path, [1, 64]) if not args.no_hf else None
    t = time.perf_counter()
    engine = Engine(path, EngineConfig(dtype="bfloat16", device="cuda", load_format="dummy", max_num_seqs=256,
                                       max_num_batched_tokens=8192, max_model_len=4096,
                                       kv_cache_memory=parse_size(args.kv_cache_memory),
                                       enforce_eager=args.enforce_eager))
    graphs = engine.runner.graphs
    emit({"bench": "load", "preset": args.preset, "seconds": round(time.perf_counter() - t, 1),
          "graphs": len(graphs.graphs) if graphs else 0,
          "capture_s": round(graphs.capture_seconds, 1) if graphs else 0.0,
          "gpu_memory_gb": round(torch.cuda.memory_allocated() / 1e9, 1), "backend": engine.backend.name})
    decode = decode_sweep(engine, cfg, [int(x) for x in args.batches.split(",")], args.ctx, args.steps, bw)
    if args.prefill:
        prefill_sweep(engine, [tuple(int(v) for v in x.split("x")) for x in args.prefill.split(",")])
    ours = {b: fixed(engine, b) for b in (1, 64)}
    for b, v in ours.items():
        emit({"bench": "engine_fixed", "batch": b, "prompt": 128, "new_tokens": 32, "output_tok_s": round(v, 1)})
    mix = mixed(engine, args.mixed) if args.mixed else None
    summary = {"bench": "summary"}
    if hf:
        summary.update({"engine_over_hf_b1": round(ours[1] / hf[1], 2), "engine_over_hf_b64": round(ours[64] / hf[64], 2)})
        if mix:
            summary["mixed_over_hf_b64"] = round(mix["output_tok_s"] / hf[64], 2)
    summary.update({f"decode_b{b}_ms": r["step_ms"] for b, r in decode.items()})
    summary.update({f"decode_b{b}_floor_ms": r["hbm_floor_ms"] for b, r in decode.items()})
    if mix:
        summary["mixed_tok_s"] = mix["output_tok_s"]
    summary["total_s"] = round(time.perf_counter() - t_all, 1)
    emit(summary)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    moe_kernels(cfg, [1, 64, 256])
    return 0


if __name__ == "__main__":
    sys.exit(main())
