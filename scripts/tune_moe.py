#!/usr/bin/env python3
"""Tune the fused MoE kernels' tiles on a CUDA device and write the table `get_config` reads.

For each token count, times `fused_experts` with the heuristic's config and each candidate of
`configs_to_try` (pruned by rows per expert: 10 to 20 per count), each call replayed from a CUDA
graph as decode runs it, the median of `triton.testing.do_bench_cudagraph`. A candidate that fails
to compile (too much shared memory) or disagrees with the heuristic's output is skipped. The best
per count goes to mesh/model/cuda/moe_configs/E=..,I=..,H=..,dtype=..,device=...json (merged with
the counts already there), unless --dry-run. With --compare, torch's grouped_mm baseline is timed
too. Compiles dominate the run: on an H200, counts 1, 64, 512 and 4096 (38 distinct configs) took a
minute; all default counts take a few.

Routing is random top-k over all experts (each token's K distinct experts), so decode batches touch
nearly every expert, as real traffic does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tune_moe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python scripts/tune_moe.py                          # Qwen3-Coder-30B-A3B, all counts\n"
               "  python scripts/tune_moe.py -E 512 --inter 512 --top-k 10   # Qwen3-Next\n"
               "  python scripts/tune_moe.py --tokens 1 64 --dry-run --compare --max-candidates 6\n")
    p.add_argument("-E", "--experts", type=int, default=128, help="experts per layer (default 128)")
    p.add_argument("--inter", type=int, default=768, help="expert intermediate size I (default 768)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size H (default 2048)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token K (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights and activations (default bfloat16)")
    p.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS,
                   help=f"token counts to tune (default {' '.join(map(str, DEFAULT_TOKENS))})")
    p.add_argument("--max-candidates", type=int, default=0,
                   help="time at most this many candidates per count, the first of configs_to_try's list (0: all)")
    p.add_argument("--rep", type=float, default=25.0, help="milliseconds of timed replays per candidate (default 25)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the JSON table goes (default mesh/model/cuda/moe_configs)")
    p.add_argument("--dry-run", action="store_true", help="time and print, write nothing")
    p.add_argument("--compare", action="store_true", help="also time the grouped_mm baseline (bf16 only)")
    p.add_argument("--seed", type=int, default=0, help="random inputs' seed (default 0)")
    return p.parse_args(argv)


def describe(cfg: dict) -> str:
    down = cfg.get("down", {})
    extra = "".join(f" d{k.replace('BLOCK_', '')}={v}" for k, v in down.items())
    return (f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} K{cfg['BLOCK_K']} G{cfg['GROUP_M']} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}{extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("tune_moe.py times kernels on a CUDA device and torch sees none here; run it on the GPU "
              "machine whose table you want (the table is named after that device).", file=sys.stderr)
        return 2
    from triton.testing import do_bench, do_bench_cudagraph

    from mesh.model.cuda import fused_moe as fm

    dtype = getattr(torch, DTYPES[args.dtype])
    e, i, h, k = args.experts, args.inter, args.hidden, args.top_k
    dev = torch.device("cuda")
    device_name = torch.cuda.get_device_name(dev)
    out_dir = args.out_dir or fm.CONFIG_DIR
    path = out_dir / fm.config_file_name(e, i, h, dtype, device_name)
    print(f"{device_name}: E={e} I={i} H={h} K={k} {args.dtype}; table {path}"
          f"{' (dry run)' if args.dry_run else ''}", flush=True)

    g = torch.Generator(dev).manual_seed(args.seed)
    w_gate_up = (torch.randn(e, 2 * i, h, generator=g, device=dev) / h ** 0.5).to(dtype)
    w_down = (torch.randn(e, h, i, generator=g, device=dev) / i ** 0.5).to(dtype)
    elem = torch.finfo(dtype).bits // 8

    def bench(fn) -> float:
        fn()  # compile and allocate outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=args.rep, return_mode="median")

    rows, table = [], {}
    t_start = time.monotonic()
    for t in args.tokens:
        x = torch.randn(t, h, generator=g, device=dev).to(dtype)
        ids = torch.rand(t, e, generator=g, device=dev).argsort(dim=1)[:, :k]  # [T, K] distinct experts
        weights = torch.softmax(torch.randn(t, k, generator=g, device=dev), dim=-1)
        out = torch.empty(t, h, dtype=dtype, device=dev)
        heuristic = fm._heuristic_config(e, i, h, t, k, dtype)
        expected = fm.fused_experts(x, w_gate_up, w_down, ids, weights, config=heuristic).float()
        cands = fm.configs_to_try(t, k, e)
        if args.max_candidates:
            cands = cands[:args.max_candidates]
        timed = []
        for n, cfg in enumerate([heuristic] + cands):
            label = "heuristic" if n == 0 else f"{n}/{len(cands)}"
            try:
                fn = lambda cfg=cfg: fm.fused_experts(x, w_gate_up, w_down, ids, weights, config=cfg, out=out)
                fn()
                err = ((out.float() - expected).norm() / expected.norm()).item()
                if not err < 2e-2:
                    print(f"  T={t} [{label}] {describe(cfg)}: output differs ({err:.2e}), skipped", flush=True)
                    continue
                ms = bench(fn)
            except Exception as exc:  # a candidate that does not fit this device: skip it
                print(f"  T={t} [{label}] {describe(cfg)}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            timed.append((ms, cfg))
            print(f"  T={t} [{label}] {describe(cfg)}: {ms * 1e3:.1f} us", flush=True)
        if not timed:
            print(f"T={t}: no candidate ran", flush=True)
            continue
        heuristic_ms = timed[0][0] if timed[0][1] is heuristic else float("nan")
        best_ms, best = min(timed, key=lambda r: r[0])
        table[t] = best
        base_ms = float("nan")
        if args.compare and dtype == torch.bfloat16:
            baseline = lambda: fm.grouped_mm_experts(x, w_gate_up, w_down, ids, weights, out=out)
            try:
                base_ms = bench(baseline)
            except Exception as exc:  # not capturable here: time it eagerly, launch gaps included
                print(f"  T={t} grouped_mm in a graph: {type(exc).__name__}: {str(exc)[:160]}; eager", flush=True)
                try:
                    base_ms = do_bench(baseline, rep=args.rep, return_mode="median")
                except Exception as exc2:
                    print(f"  T={t} grouped_mm: {type(exc2).__name__}: {str(exc2)[:160]}", flush=True)
        flops, nbytes = fm.tile_flops_bytes(t, k, e, i, h, elem)
        rows.append((t, best_ms, heuristic_ms, base_ms, nbytes / best_ms / 1e6, flops / best_ms / 1e9, describe(best)))
        print(f"T={t}: best {best_ms * 1e3:.1f} us ({describe(best)}), heuristic {heuristic_ms * 1e3:.1f} us, "
              f"{time.monotonic() - t_start:.0f} s so far", flush=True)

    print(f"\n{'T':>6} {'best us':>9} {'heur us':>9} {'gmm us':>9} {'GB/s':>7} {'TFLOP/s':>8}  best config")
    for t, best_ms, heur_ms, base_ms, gbs, tflops, desc in rows:
        print(f"{t:>6} {best_ms * 1e3:>9.1f} {heur_ms * 1e3:>9.1f} {base_ms * 1e3:>9.1f} {gbs:>7.0f} {tflops:>8.1f}  {desc}")
    print("(GB/s: the fewest bytes a layer must move, weights of touched experts plus activations, over the time)")
    if table and not args.dry_run:
        merged = {}
        if path.is_file():
            merged = {int(n): c for n, c in json.loads(path.read_text()).items()}
        merged.update(table)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({str(n): merged[n] for n in sorted(merged)}, indent=1) + "\n")
        print(f"wrote {len(table)} counts to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
