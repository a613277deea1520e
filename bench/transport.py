"""The collective dispatcher's transport alone, without Ray or a model: one gateway rank and W expert
ranks over gloo on this machine, the `bench` preset's shapes (16 experts top-4, hidden 512, 8 MoE
layers, bf16 rows), experts echoing rows back. Per layer: dispatch + combine against a bare
`all_to_all_single` exchange of the same rows among the same ranks, in the same run.

    .venv/bin/python bench/transport.py [--workers 1,2,4] [--tokens 64,256] [--steps 20]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import bare_exchange_seconds, emit, hardware

from mesh.model.moe import ExpertShard, ExpertWeights, route
from mesh.parallel.collective import ECHO, CollectiveDispatcher, ExpertServer, init_mesh_group
from mesh.parallel.placement import Placement

E, K, H, I, L = 16, 4, 512, 256, 8


def _rank(rank: int, workers: int, port: int, tokens: int, steps: int, results) -> None:
    torch.set_num_threads(1)  # one process per core's worth of work; the machine has few
    init_mesh_group(f"tcp://127.0.0.1:{port}", 1 + workers, rank, backend="gloo")
    placement, dtype = Placement.contiguous(L, E, workers), torch.bfloat16
    if rank == 0:
        d = CollectiveDispatcher(placement, 1, H, dtype)
        d.step_flags = ECHO
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, H, generator=g).to(dtype)
        ids, weights = route(hidden @ torch.randn(E, H, generator=g).to(dtype).T, K, True, dtype)
        for s in range(steps + 2):
            if s == 2:
                d.reset_counters()  # two warm-up steps
            d.begin_step(tokens)
            for layer in range(L):
                d.combine(d.dispatch(layer, hidden, ids, weights))
            d.end_step()
        echo = statistics.mean(d.layer_seconds) / steps
        bare = bare_exchange_seconds(d, steps, repeat=steps)
        d.shutdown()
        results.put({"workers": workers, "tokens": tokens, "rows_per_layer": tokens * K,
                     "dispatch_combine_ms_per_layer": echo * 1e3, "bare_all_to_all_ms_per_layer": bare * 1e3,
                     "ratio": echo / bare})
    else:
        shard = ExpertShard([ExpertWeights(gate_up=torch.zeros(len(s), 2 * I, H, dtype=dtype),
                                           down=torch.zeros(len(s), H, I, dtype=dtype))
                             for s in placement.local_slots(rank - 1)])
        ExpertServer(shard, placement, 1).run()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="expert ranks to try, comma-separated")
    ap.add_argument("--tokens", default="64,256", help="tokens per step to try, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    args = ap.parse_args()
    emit({"bench": "transport", "hardware": hardware()})
    ctx = mp.get_context("spawn")
    for workers in (int(x) for x in args.workers.split(",")):
        if E % workers:
            ap.error(f"--workers {workers} does not divide the {E} experts")
        for tokens in (int(x) for x in args.tokens.split(",")):
            results = ctx.Queue()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [ctx.Process(target=_rank, args=(r, workers, port, tokens, args.steps, results))
                     for r in range(workers + 1)]
            for p in procs:
                p.start()
            try:
                emit(results.get(timeout=600))
            finally:
                for p in procs:
                    p.join(30)
                    if p.is_alive():
                        p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
