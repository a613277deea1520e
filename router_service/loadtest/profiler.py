"""`mesh profile`: sweep deployment shapes over rates up to saturation, into one profile file.

For each shape (a running server, or `mesh serve --workers W` started here for each W asked for) the
load rises level by level, geometrically from --start-rate (or through the --rates given), until a
level saturates the server: requests fail, the queue grows within the level (the last quarter of
arrivals waits clearly longer than the second), or the completed rate falls well short of the
offered one. The saturating level is kept (it tells the planner where the shape stops keeping up).

The file (`mesh.profile/1`): {"schema", "created_at", "shapes": [one `mesh loadtest` report per
shape, each with `launch` (how it was started) and `sweep` (why it stopped)]}. `mesh plan --profile`
reads it as it reads a report.json.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mesh.plan.metrics import percentile
from mesh.plan.workload import Dist, RequestSpec
from router_service.loadtest.generator import RunSpec
from router_service.loadtest.localserve import LocalServer
from router_service.loadtest.runner import LoadTest, run_loadtest

SCHEMA = "mesh.profile/1"


@dataclass
class Sweep:
    """The load levels of one shape: `rates` as given, else start_rate * factor^i up to saturation."""
    duration: float = 20.0
    rates: list[float] | None = None
    start_rate: float = 1.0
    factor: float = 2.0
    max_levels: int = 8
    seed: int = 0
    drain_timeout: float = 60.0


@dataclass
class Workload:
    prompt: Dist = field(default_factory=lambda: Dist("fixed", 128))
    output: Dist = field(default_factory=lambda: Dist("fixed", 64))
    trace: list[RequestSpec] | None = None


def saturation(run: dict) -> str | None:
    """Why a level shows the server no longer keeping up (None: it kept up)."""
    q = run["requests"]
    if q["sent"] and q["failed"] > 0.01 * q["sent"]:
        return f"{q['failed']} of {q['sent']} requests failed"
    reqs = sorted(run.get("profile", {}).get("requests") or [])
    n = len(reqs)
    if n >= 16:
        q2 = [r[4] for r in reqs[n // 4: n // 2]]
        q4 = [r[4] for r in reqs[3 * n // 4:]]
        a, b = sum(q2) / len(q2), sum(q4) / len(q4)
        if b > 1.5 * a + 50.0:
            return f"the queue grows: TTFT of the last quarter {b:.0f} ms against {a:.0f} ms in the second"
    sends = (run.get("generator") or {}).get("achieved_send_rps") or run.get("rate") or 0.0
    if sends and run["throughput_rps"] < 0.8 * sends:
        return f"completed {run['throughput_rps']:.2f} req/s of {sends:.2f} sent"
    return None


def _level_line(label: str, run: dict, why: str | None) -> str:
    f = lambda d, k: "-" if (d or {}).get(k) is None else f"{d[k]:.1f}"  # noqa: E731
    # a generator that fell behind its schedule (a busy machine) still drove the server: its counters
    # are good, its client-side latencies less so (the planner's latency calibration skips the level)
    lag = ("; the load generator fell behind (" + "; ".join(run["generator"]["reasons"]) + ")"
           if run.get("generator_bottleneck") else "")
    return (f"[{label}] {run['rate']:g} req/s: TTFT p50 {f(run['ttft_ms'], 'p50')} ms, TPOT p50 "
            f"{f(run['tpot_ms'], 'p50')} ms, {run['throughput_rps']:.2f} req/s completed"
            + (f" -> saturated ({why})" if why else "") + lag)


def next_level(sweep: Sweep, label: str, progress) -> Callable[[list[dict]], RunSpec | None]:
    """The level after the reports so far (None: stop), printing one line per finished level."""
    state = {"reason": None}

    def decide(done: list[dict]) -> RunSpec | None:
        if done:
            why = saturation(done[-1])
            if progress is not None:
                print(_level_line(label, done[-1], why), file=progress, flush=True)
            if why:
                state["reason"] = why
                return None
        i = len(done)
        if sweep.rates is not None:
            if i >= len(sweep.rates):
                state["reason"] = "every --rates level ran"
                return None
            rate = sweep.rates[i]
        else:
            if i >= sweep.max_levels:
                state["reason"] = f"--max-levels {sweep.max_levels} reached without saturating"
                return None
            rate = sweep.start_rate * sweep.factor ** i
        return RunSpec(rate=rate, duration=sweep.duration, seed=sweep.seed, drain_timeout=sweep.drain_timeout)
    decide.state = state
    return decide


def profile_target(target: str, sweep: Sweep, work: Workload, out_dir: Path, label: str = "target",
                   progress=sys.stderr) -> dict:
    """Sweep one running server; its loadtest report (report.json and requests.jsonl in out_dir)."""
    decide = next_level(sweep, label, progress)
    lt = LoadTest(target=target, runs=[], out=out_dir, prompt=work.prompt, output=work.output, trace=work.trace,
                  progress=False, plots=False, seed=sweep.seed, next_run=decide)
    report = run_loadtest(lt)
    rates = [r["rate"] for r in report["runs"]]
    report["sweep"] = {"rates": rates, "stopped": decide.state["reason"],
                       "saturated": saturation(report["runs"][-1]) is not None}
    return report


def profile_shapes(workers: list[int], sweep: Sweep, work: Workload, out_dir: Path, *, model: str | None = None,
                   serve_args: list[str] | None = None, env: dict[str, str] | None = None,
                   progress=sys.stderr) -> list[dict]:
    """Start `mesh serve --workers W` for each W in turn, sweep it, stop it."""
    reports = []
    for w in workers:
        label = f"--workers {w}"
        if progress is not None:
            print(f"[{label}] starting mesh serve ...", file=progress, flush=True)
        with LocalServer(w, model, serve_args, env, log=out_dir / f"serve-w{w}.log") as srv:
            rep = profile_target(srv.target, sweep, work, out_dir / f"w{w}", label, progress)
        rep["launch"] = {"workers": w, "model": model, "serve_args": list(serve_args or []), "env": dict(env or {})}
        reports.append(rep)
    return reports


def write_profile(path: Path, reports: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shapes": reports}
    path.write_text(json.dumps(doc) + "\n")
    return path


def summary_line(rep: dict) -> str:
    runs = rep["runs"]
    top = max(runs, key=lambda r: r["throughput_rps"])
    w = rep.get("model", {}).get("num_expert_workers", 0)
    p50 = percentile([r["tpot_ms"]["p50"] for r in runs if r["tpot_ms"]["p50"] is not None], 50)
    return (f"--workers {w}: {len(runs)} levels ({', '.join(f'{r:g}' for r in rep['sweep']['rates'])} req/s), "
            f"highest completed {top['throughput_rps']:.2f} req/s; TPOT p50 median "
            f"{p50 if p50 is not None else math.nan:.1f} ms; stopped: {rep['sweep']['stopped']}")
