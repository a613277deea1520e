"""A whole load test: every load level against one target, then the report files.

    report = run_loadtest(LoadTest(target="127.0.0.1:50051", runs=[RunSpec(rate=2, duration=30)],
                                   prompt=Dist.parse("128"), output=Dist.parse("32"), out=Path("lt")))
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mesh.plan.workload import Dist, RequestSpec, synthetic
from router_service.loadtest import report as rpt
from router_service.loadtest.generator import LoadGenerator, Prompts, RunSpec, trace_schedule


@dataclass
class LoadTest:
    target: str
    runs: list[RunSpec]
    out: Path
    prompt: Dist = field(default_factory=lambda: Dist("fixed", 128))
    output: Dist = field(default_factory=lambda: Dist("fixed", 64))
    trace: list[RequestSpec] | None = None
    tenant: str = ""
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    channels: int = 4
    # how to reach a server with TLS and/or tokens: MeshClient's keyword arguments (token, tls, tls_ca,
    # tls_cert, tls_key, tls_server_name); None: plain text, no token
    security: dict | None = None
    progress: bool = True
    plots: bool = True
    seed: int = 0
    # decides the levels one at a time instead of `runs`: given the reports of the levels run so far,
    # the next level, or None to stop (mesh profile's sweep up to saturation)
    next_run: Callable[[list[dict]], RunSpec | None] | None = None


def _requests(lt: LoadTest, run_index: int):
    if lt.trace is not None:
        return itertools.cycle(lt.trace)
    gen = synthetic(lt.prompt, lt.output, lt.seed + 1000 * run_index)
    if lt.tenant:
        return (RequestSpec(s.prompt_tokens, s.output_tokens, tenant=lt.tenant) for s in gen)
    return gen


def _model_config(info: dict) -> dict | None:
    """The served model's config.json when this machine can read it (the planner's FLOP split)."""
    try:
        return json.loads((Path(info.get("model", "")) / "config.json").read_text())
    except (OSError, ValueError):
        return None


async def _run(lt: LoadTest) -> tuple[dict, list[dict]]:
    gen = LoadGenerator(lt.target, lt.channels, sys.stderr if lt.progress else None, security=lt.security)
    try:
        info = await gen.model_info()
        rtt = await gen.rtt_ms()
        first = await gen.server_stats()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        runs, records, results = [], [], []
        specs = iter(lt.runs) if lt.next_run is None else iter(lambda: lt.next_run(runs), None)
        for i, spec in enumerate(specs):
            prompts = Prompts(info.get("vocab_size", 2), lt.seed + i, spec.temperature)
            schedule = trace_schedule(lt.trace, spec.duration) if spec.arrival == "trace" else None
            res = await gen.run(spec, _requests(lt, i), prompts, schedule, i)
            results.append(res)
            runs.append(rpt.run_report(res, lt.slo_ttft_ms, lt.slo_tpot_ms))
            records += res.records
        last = await gen.server_stats()
    finally:
        await gen.close()
    server = {"max_num_seqs": (first or {}).get("max_num_seqs"),
              "max_num_batched_tokens": (first or {}).get("max_num_batched_tokens"),
              "num_kv_blocks": info.get("num_kv_blocks"), "block_size": info.get("block_size"),
              "max_queued_requests": info.get("max_queued_requests"), "rtt_ms": rtt,
              "stats": {k: v for k, v in (last or {}).items() if k != "expert_load"}}
    workload = ({"trace": len(lt.trace)} if lt.trace is not None else
                {"prompt_tokens": str(lt.prompt), "output_tokens": str(lt.output)})
    workload["seed"] = lt.seed
    # the load generator's machine: where `mesh profile` and `mesh plan --validate` start servers, the
    # cores `mesh serve` splits between a gateway and its workers
    client = {"cores": os.cpu_count(), "host": socket.gethostname()}
    meta = {"target": lt.target, "started_at": started, "model": info, "model_config": _model_config(info),
            "server": server, "workload": workload, "client": client}
    return rpt.build_report(meta, runs, rpt.load_delta(first, last)), records


def run_loadtest(lt: LoadTest) -> dict:
    """Run every level, write OUT/report.json, requests.jsonl, plots; returns the report."""
    report, records = asyncio.run(_run(lt))
    report["files"] = [p.name for p in rpt.write(lt.out, report, records, lt.plots)]
    (lt.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")  # now with the file list
    return report
