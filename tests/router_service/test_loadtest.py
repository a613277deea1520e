"""`mesh loadtest`: the arrival processes, workloads and traces, the report's arithmetic on fixed
records, the profile intervals, the generator over real gRPC (a null target and the real gateway),
GetServerStats, and the CLI's errors."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time

import pytest

from mesh.plan.metrics import percentile, summarize
from mesh.plan.workload import (Dist, RequestSpec, arrival_offsets, cached_tokens, code_completion_trace,
                                load_trace, write_trace)
from router_service.loadtest import report as rpt
from router_service.loadtest.cli import main as cli_main


# ---- arrivals ---------------------------------------------------------------------------------
def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    rate, duration = 50.0, 400.0
    offs = arrival_offsets("poisson", rate, duration, seed=3)
    assert abs(len(offs) / duration - rate) / rate < 0.02  # 20k arrivals: sd 0.7%
    assert offs == sorted(offs) and 0 <= offs[0] and offs[-1] < duration
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert abs(mean * rate - 1) < 0.02 and abs(sd / mean - 1) < 0.03  # exponential: CV 1
    # Kolmogorov-Smirnov against Exp(rate): D below the 1% critical value 1.63 / sqrt(n)
    xs = sorted(gaps)
    n = len(xs)
    d = max(max((i + 1) / n - (1 - math.exp(-rate * x)), (1 - math.exp(-rate * x)) - i / n) for i, x in enumerate(xs))
    assert d < 1.63 / math.sqrt(n)
    # memoryless tail: P(gap > 2/rate) = e^-2
    assert abs(sum(g > 2 / rate for g in gaps) / n - math.exp(-2)) < 0.01


def test_constant_arrivals_are_evenly_spaced():
    offs = arrival_offsets("constant", 4.0, 2.0)
    assert offs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    with pytest.raises(ValueError, match="poisson or constant"):
        arrival_offsets("bursty", 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        arrival_offsets("poisson", 0.0, 1.0)


def test_length_distributions_parse_and_sample():
    rng = random.Random(0)
    assert Dist.parse("128").sample(rng) == 128
    u = Dist.parse("uniform:10:20")
    xs = [u.sample(rng) for _ in range(2000)]
    assert min(xs) >= 10 and max(xs) <= 20 and abs(sum(xs) / len(xs) - 15) < 0.3
    ln = Dist.parse("lognormal:100:0.5")
    xs = sorted(ln.sample(rng) for _ in range(4000))
    assert abs(xs[len(xs) // 2] - 100) < 5  # the median
    assert str(Dist.parse("exponential:64")) == "exponential:64" and Dist.parse("normal:50:5").mean == 50
    for bad, msg in (("zipf:2", "unknown distribution"), ("uniform:5", "takes 2"), ("uniform:9:3", "LO <= HI"),
                     ("0", ">= 1"), ("normal:x:1", "not a length")):
        with pytest.raises(ValueError, match=msg):
            Dist.parse(bad)


def test_trace_round_trip_errors_and_shared_prefixes(tmp_path):
    specs = code_completion_trace(200, 10.0, repos=4, prefix=Dist("fixed", 100), seed=1)
    path = write_trace(tmp_path / "t.jsonl", specs)
    back = load_trace(path)
    assert back == specs
    assert all(s.prefix_tokens == 100 and s.prompt_tokens > 100 for s in back)
    hits = cached_tokens(back, block_size=16)
    # the first request of each (tenant, repository) misses; later ones reuse 6 full blocks
    assert sum(h == 0 for h in hits) == len({(s.tenant, s.prefix_id) for s in back})
    assert set(hits) == {0, 96}
    bad = tmp_path / "bad.jsonl"
    for line, msg in (('{"prompt_tokens": 5}', "output_tokens"), ('{"output_tokens": 5}', "prompt_tokens"),
                      ("[1]", "JSON object"), ("{", "not JSON"),
                      ('{"prompt_tokens": 5, "output_tokens": 1, "prefix_tokens": 9}', "prefix_tokens")):
        bad.write_text('{"prompt_tokens": 3, "output_tokens": 2, "offset_s": 0}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{msg}"):
            load_trace(bad)
    bad.write_text('{"prompt_tokens": 3, "output_tokens": 2, "offset_s": 5}\n{"prompt_tokens": 3, "output_tokens": 2, "offset_s": 1}\n')
    with pytest.raises(ValueError, match="sort the trace"):
        load_trace(bad)
    text = load_trace(write_trace(tmp_path / "x.jsonl", [RequestSpec(7, 3, 0.0, prompt="def f(x):")]))[0]
    assert text.prompt == "def f(x):" and text.prompt_tokens == 7


# ---- the report's arithmetic ----------------------------------------------------------------
def _rec(sent, first, end, out, prompt=100, cached=0, code="OK", itl=None):
    return {"sent_s": sent, "first_token_s": first, "end_s": end, "output_tokens": out, "prompt_tokens": prompt,
            "cached_tokens": cached, "code": code, "itl_ms": itl or []}


def test_summary_arithmetic_on_fixed_records():
    recs = [
        _rec(0.0, 0.1, 1.1, 11, cached=50, itl=[100.0] * 10),  # ttft 100, tpot 100
        _rec(1.0, 1.2, 1.6, 5, itl=[100.0] * 4),  # ttft 200, tpot 100
        _rec(2.0, 2.3, 2.3, 1),  # ttft 300, one token: no tpot
        _rec(3.0, 3.4, 4.6, 4, prompt=50, itl=[400.0] * 3),  # ttft 400, tpot 400
        _rec(3.5, None, 3.6, 0, code="RESOURCE_EXHAUSTED"),
        _rec(4.0, None, 5.0, 0, code="DEADLINE_EXCEEDED"),
        _rec(4.5, None, 4.6, 0, code="RESOURCE_EXHAUSTED"),
    ]
    s = summarize(recs, slo_ttft_ms=250, slo_tpot_ms=200)
    assert s["requests"] == {"sent": 7, "completed": 4, "failed": 3}
    assert s["errors"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert s["window_s"] == pytest.approx(5.0)
    t = s["ttft_ms"]  # 100, 200, 300, 400
    assert (t["mean"], t["p50"], t["p90"], t["p99"]) == pytest.approx((250, 250, 370, 397))
    assert s["tpot_ms"]["p50"] == pytest.approx(100) and s["tpot_ms"]["mean"] == pytest.approx(200)
    assert s["tpot_ms"]["count"] == 3
    assert s["itl_ms"]["count"] == 17 and s["itl_ms"]["p50"] == pytest.approx(100)
    assert s["e2e_ms"]["p50"] == pytest.approx(850)  # 1100, 600, 300, 1600
    assert s["output_tokens_per_s"] == pytest.approx(21 / 5.0)
    assert s["throughput_rps"] == pytest.approx(4 / 5.0)
    # within both SLOs: the first two (ttft 100/200, tpot 100); the third has no tpot, ttft 300 > 250
    assert s["goodput_rps"] == pytest.approx(2 / 5.0) and s["slo"]["attainment"] == pytest.approx(0.5)
    assert s["cached_token_share"] == pytest.approx(50 / 350)
    assert summarize([])["requests"] == {"sent": 0, "completed": 0, "failed": 0}
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None


def test_profile_intervals_count_steps_busy_time_and_tokens():
    # two requests: [0, 1.0] and [2.5, 3.0]; polls each 0.5 s with 10 steps between polls
    recs = [_rec(0.0, 0.2, 1.0, 5, prompt=10, itl=[200.0] * 4), _rec(2.5, 2.6, 3.0, 3, prompt=4, cached=2, itl=[200.0] * 2)]
    polls = [{"t": 0.5 * i, "steps": 10 * i} for i in range(8)]  # 0 .. 3.5
    iv = rpt.profile_intervals(recs, polls, window=1.0)
    assert [row[:2] for row in iv] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert [row[2] for row in iv] == pytest.approx([1.0, 0.0, 0.5])  # busy seconds
    assert [row[3] for row in iv] == [20, 20, 20]
    # first request: prefill 10 at 0.2 (ctx 55) + decodes at 0.4, 0.6, 0.8 (ctx 11, 12, 13); the one at 1.0 falls in [1, 2)
    assert iv[0][4:] == [3, 10, 55 + 11 + 12 + 13]
    assert iv[1][4:] == [1, 0, 14]
    # second: prefill 2 uncached tokens after 2 cached (ctx 2*2 + 3 = 7) at 2.6, decode at 2.8 (ctx 5); 3.0 is out
    assert iv[2][4:] == [1, 2, 7 + 5]


# ---- the generator over real gRPC -----------------------------------------------------------
def _run_against_null(spec, n_tokens=1):
    from router_service.loadtest.generator import LoadGenerator, Prompts
    from router_service.loadtest.nulltarget import start
    from mesh.plan.workload import synthetic

    async def go():
        server, port = await start(0, n_tokens)
        gen = LoadGenerator(f"127.0.0.1:{port}", channels=2)
        try:
            info = await gen.model_info()
            return await gen.run(spec, synthetic(Dist("fixed", 8), Dist("fixed", n_tokens)), Prompts(info["vocab_size"]))
        finally:
            await gen.close()
            await server.stop(0)
    return asyncio.run(go())


def test_generator_sends_on_schedule_against_a_null_target():
    from router_service.loadtest.generator import RunSpec
    res = _run_against_null(RunSpec(rate=200.0, duration=2.0, arrival="constant", max_lag_ms=200.0), n_tokens=3)
    assert len(res.records) == 400
    assert all(r["code"] == "OK" and r["output_tokens"] == 3 and len(r["itl_ms"]) == 2 for r in res.records)
    g = res.generator
    intended = sorted(r["intended_s"] for r in res.records)
    assert intended == pytest.approx([i / 200 for i in range(400)])  # the schedule: every 5 ms
    lags = [r["sent_s"] - r["intended_s"] for r in res.records]
    assert min(lags) >= -1e-3  # never early (how late depends on the machine's load: a benchmark's figure)
    assert g["achieved_send_rps"] <= 200 * 1.01  # so it cannot beat the offered rate
    # the self-check is consistent with what it measured: flagged exactly when a lag p99 passes the budget
    over = [p for p in (g["send_lag_ms"]["p99"], g["loop_lag_ms"]["p99"]) if p is not None and p > g["max_lag_ms"]]
    assert g["bottleneck"] == bool(over) and len(g["reasons"]) == len(over), g
    assert g["send_lag_ms"]["max"] <= max(lags) * 1000 + 1.0  # measured at the launch, before the send
    assert res.polls and res.polls[-1]["steps"] == 400  # the null target counts requests as steps


def test_generator_flags_itself_as_the_bottleneck():
    from router_service.loadtest.generator import RunSpec
    # a lag budget no real event loop meets: the run must say its figures measure the generator
    res = _run_against_null(RunSpec(rate=300.0, duration=1.0, max_lag_ms=1e-6))
    assert res.generator["bottleneck"] and "lag" in res.generator["reasons"][0]


def test_closed_loop_keeps_the_concurrency():
    from router_service.loadtest.generator import RunSpec
    res = _run_against_null(RunSpec(rate=None, concurrency=4, duration=0.5))
    assert len(res.records) > 4  # completions sent more (how many fit in 0.5 s is the machine's)
    # at every send, at most 4 requests were in flight
    events = sorted([(r["sent_s"], 1) for r in res.records] + [(r["end_s"], -1) for r in res.records],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _t, d in events:
        level += d
        peak = max(peak, level)
    assert peak <= 4


# ---- against the real gateway -----------------------------------------------------------------
def _serve(model_dir):
    """A Gateway on a free loopback port (its event loop in a thread) until the generator resumes."""
    from mesh.config import EngineConfig
    from mesh.engine.engine import Engine
    from router_service.server import Gateway
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    call = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(60)  # noqa: E731
    gw = Gateway(lambda: Engine(model_dir, EngineConfig(dtype="float32", kv_cache_memory=4 << 20)), "127.0.0.1", 0)
    call(gw.start())
    call(gw.load())
    yield f"127.0.0.1:{gw.port}", gw
    call(gw.stop(grace=0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def gateway(tiny_dir):
    yield from _serve(tiny_dir)


@pytest.fixture
def fresh_gateway(tiny_dir):
    """A gateway no other test has sent requests to (its step counters start at zero)."""
    yield from _serve(tiny_dir)


def test_server_stats_report_queues_steps_and_expert_load(fresh_gateway):
    from router_service.client import MeshClient
    target, gw = fresh_gateway
    with MeshClient(target, timeout=30) as c:
        c.complete(prompt_token_ids=[1, 2, 3, 4], max_tokens=4, temperature=0, ignore_eos=True)
        deadline = time.monotonic() + 30  # the snapshot is the engine thread's last pass: it may lag one step
        while True:
            st = c.server_stats()
            if st["running"] == 0 and st["in_flight"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert st["steps"] >= 4 and st["running"] == 0 and st["in_flight"] == 0
    # the step counters: one prefill of 4 tokens, then 3 decodes (contexts 5, 6, 7), one sequence each
    assert (st["steps"], st["scheduled_sequences"], st["prefill_tokens"], st["decode_tokens"]) == (4, 4, 4, 3)
    assert st["context_tokens"] == (1 + 2 + 3 + 4) + 5 + 6 + 7
    assert st["busy_seconds"] > st["forward_seconds"] > st["expert_seconds"] > 0
    assert st["busy_cpu_seconds"] > st["forward_cpu_seconds"] > st["expert_cpu_seconds"] > 0
    assert st["busy_cpu_seconds"] <= st["busy_seconds"] * 1.01  # one thread's CPU fits in its wall time
    assert st["compute_threads"] >= 1 and st["worker_threads"] == 0 and st["worker_compute_seconds"] == []
    # each step on its own, on request: the ones after a step number
    import grpc
    from router_service.protos import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        recent = stub.GetServerStats(pb.GetServerStatsRequest(steps_after=0), timeout=10).recent_steps
        later = stub.GetServerStats(pb.GetServerStatsRequest(steps_after=2), timeout=10).recent_steps
        plain = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10).recent_steps
    assert [(r.step, r.sequences, r.prefill_tokens, r.decode_tokens, r.context_tokens) for r in recent] == \
        [(1, 1, 4, 0, 10), (2, 1, 0, 1, 5), (3, 1, 0, 1, 6), (4, 1, 0, 1, 7)]
    assert all(r.busy_seconds >= r.forward_seconds > r.expert_seconds > 0 for r in recent)
    assert sum(r.forward_seconds for r in recent) == pytest.approx(st["forward_seconds"])
    assert [r.step for r in later] == [3, 4] and len(plain) == 0
    assert st["kv_blocks_used"] + st["kv_blocks_free"] == gw.engine.blocks.num_blocks
    assert st["max_num_seqs"] == 256 and st["max_num_batched_tokens"] == 2048
    # tiny preset: 2 layers, layer 1 dense -> 1 MoE layer of 8 experts, top-2
    assert st["moe_layers"] == 1 and st["num_experts"] == 8 and len(st["expert_load"]) == 1
    assert sum(st["expert_load"][0]) >= 2 * (4 + 3)  # prompt + 3 decode steps, 2 experts per token


def test_loadtest_cli_writes_the_report_and_plan_reads_it(gateway, tmp_path, capsys):
    target, _gw = gateway
    out = tmp_path / "lt"
    trace = write_trace(tmp_path / "w.jsonl", code_completion_trace(40, 20.0, repos=2, prefix=Dist("fixed", 48),
                                                                    suffix=Dist("uniform", 4, 16),
                                                                    output=Dist("fixed", 4)))
    assert cli_main(["loadtest", "--target", target, "--rate", "8,16", "--duration", "2", "--workload", str(trace),
                     "--out", str(out), "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000", "--no-progress",
                     "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["rate"] for x in lines] == [8, 16]
    rep = json.loads((out / "report.json").read_text())
    for key in ("requests", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "output_tokens_per_s", "goodput_rps",
                "cached_token_share", "errors", "runs", "expert_load", "generator_bottleneck"):
        assert key in rep, key
    assert set(rep["ttft_ms"]) >= {"p50", "p90", "p99"}
    assert rep["requests"] == rep["runs"][-1]["requests"] and rep["requests"]["failed"] == 0
    assert rep["requests"]["completed"] == rep["requests"]["sent"] > 10
    assert rep["cached_token_share"] > 0.3  # repeated repository prefixes hit the prefix cache
    assert rep["model"]["num_experts"] == 8 and rep["moe_layers"] == 1 and sum(rep["expert_load"][0]) > 0
    assert rep["runs"][0]["profile"]["intervals"] and rep["runs"][0]["timeline"]
    prof = rep["runs"][0]["profile"]
    cols = prof["server_columns"]
    sums = {c: sum(row[cols.index(c)] for row in prof["server_intervals"]) for c in ("steps", "busy_s", "forward_s")}
    assert sums["steps"] > 0 and sums["busy_s"] >= sums["forward_s"] > 0
    recs = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == sum(r["requests"]["sent"] for r in rep["runs"])
    assert {r["tenant"] for r in recs} == {"tenant-0", "tenant-1"}
    for name in ("latency.png", "throughput.png", "expert_load.png", "timeline.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html.replace("https://", "")

    assert cli_main(["plan", "--profile", str(out / "report.json"), "--target-rps", "4", "--max-devices", "4",
                     "--requests", "200", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("gateways", "expert_workers", "redundant_experts", "predicted", "margin", "assumptions",
                "extrapolation", "interval", "max_rps"):
        assert key in plan
    assert plan["feasible"] and plan["gateways"] >= 1
    assert plan["margin"] is None and not plan["slo_given"]  # no SLOs: no margin to report
    assert set(plan["predicted"]["ttft_ms"]) >= {"p50", "p90", "p99"} and plan["predicted"]["output_tokens_per_s"] > 0


@pytest.mark.parametrize("argv, flag", [
    (["--rate", "0"], "--rate"), (["--rate", "x"], "--rate"), (["--concurrency", "1.5"], "--concurrency"),
    ([], "--rate"), (["--rate", "1", "--duration", "-1"], "--duration"),
    (["--rate", "1", "--prompt-tokens", "zipf:1"], "--prompt-tokens"),
    (["--rate", "1", "--workload", "/nonexistent.jsonl"], "--workload"),
    (["--arrival", "trace", "--rate", "1"], "--arrival"),
])
def test_loadtest_errors_name_the_flag(argv, flag, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["loadtest", "--target", "127.0.0.1:1", "--out", str(tmp_path), *argv])
    assert flag in str(e.value)


def test_server_intervals_difference_the_counters():
    polls = [{"t": 0.25 * i, "steps": 10 * i, "seqs": 20 * i, "decode": 15 * i, "prefill": 100 * i, "ctx": 1000 * i,
              "busy_s": 0.2 * i, "forward_s": 0.15 * i, "expert_s": 0.05 * i, "worker_s": [0.01 * i, 0.03 * i]}
             for i in range(5)]
    polls[3:] = [dict(p, steps=30, seqs=60, decode=45, prefill=300, ctx=3000, busy_s=0.6, forward_s=0.45,
                      expert_s=0.15, worker_s=[0.03, 0.09]) for p in polls[3:]]  # idle from t = 0.75
    assert [r[:3] for r in rpt.server_intervals(polls, window=0.5)] == [[0.0, 0.5, 20], [0.5, 1.0, 10]]
    rows = rpt.server_intervals(polls, window=0.25)
    assert [r[:3] for r in rows] == [[0.0, 0.25, 10], [0.25, 0.5, 10], [0.5, 0.75, 10]]
    row = dict(zip(rpt.SERVER_COLUMNS, rows[0]))
    assert (row["seqs"], row["decode"], row["prefill"], row["ctx"]) == (20, 15, 100, 1000)
    assert row["busy_s"] == pytest.approx(0.2) and row["worker_max_s"] == pytest.approx(0.03)
    assert row["worker_sum_s"] == pytest.approx(0.04)
    assert rpt.server_intervals([{"t": 0.0, "steps": 0}, {"t": 1.0, "steps": 5}]) == []  # a server without them


def test_plan_errors_name_the_flag(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{}")
    gpu = tmp_path / "g.jsonl"
    gpu.write_text('{"bench": "copy", "gpu": "NVIDIA H200", "tb_s": 4.2}\n')
    for argv, flag in ((["--target-rps", "1"], "--hardware"),
                       (["--target-rps", "1", "--profile", str(bad)], "--profile"),
                       (["--target-rps", "-1", "--hardware", "h100"], "--target-rps"),
                       (["--target-rps", "1", "--hardware", "h100", "--model", "gpt-5"], "--model"),
                       (["--target-rps", "1", "--hardware", "h100"], "--model"),
                       (["--target-rps", "1", "--hardware", "h200", "--gpu-profile", str(gpu)], "--gpu-profile"),
                       (["--target-rps", "1", "--hardware", "h100", "--model", "qwen3-coder-next", "--validate"],
                        "--validate"),
                       (["--target-rps", "1", "--hardware", "h100", "--expert-workers", "x"], "--expert-workers")):
        with pytest.raises(SystemExit) as e:
            cli_main(["plan", *argv])
        assert flag in str(e.value), (argv, str(e.value))


@pytest.mark.parametrize("argv, flag", [
    ([], "--workers"), (["--workers", "x"], "--workers"), (["--workers", "0", "--factor", "1"], "--factor"),
    (["--workers", "0", "--serve-args", "--port 5"], "--serve-args"), (["--workers", "0", "--env", "X"], "--env"),
    (["--target", "127.0.0.1:1", "--model", "m"], "--target"), (["--workers", "0", "--rates", "0"], "--rates"),
])
def test_profile_errors_name_the_flag(argv, flag, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["profile", "--out", str(tmp_path / "p.json"), *argv])
    assert flag in str(e.value)
