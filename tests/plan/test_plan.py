"""The planner: the simulator against closed-form queueing results (M/D/1, M/M/1), continuous
batching arithmetic; the measured model's fits recovering known step laws from synthetic profiles,
part by part and across deployment shapes; extrapolation warnings and prediction intervals; honest
output (no margin without SLOs, assumptions listed); GPU profiles; the roofline against published
serving figures; the deployment search's monotonicity and hardware-only plans."""

from __future__ import annotations

import json
import math
import random

import pytest

from mesh.plan import hardware
from mesh.plan.fit import fit
from mesh.plan.gpu import GpuProfileModel, load_gpu_profile, mixed_requests
from mesh.plan.measured import MeasuredModel
from mesh.plan.metrics import summarize
from mesh.plan.perfmodel import Deployment, Imbalance, RooflineModel, valid_redundancy
from mesh.plan.planner import plan, predict_requests, synthetic_workload
from mesh.plan.profile import build_model, load_profile
from mesh.plan.search import Slo, Workload
from mesh.plan.simulate import Batch, Limits, SimRequest, simulate, simulate_replicas
from mesh.plan.workload import Dist

ONE_AT_A_TIME = Limits(max_num_seqs=1, max_num_batched_tokens=10 ** 9)


def _poisson(lam: float, n: int, seed: int, prompt=lambda rng: 1) -> list[SimRequest]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(lam)
        out.append(SimRequest(t, prompt(rng), 1))
    return out


def _mean_sojourn(records) -> float:
    return sum(r["end_s"] - r["sent_s"] for r in records) / len(records)


# ---- the simulator ----------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_md1_mean_time_in_system(rho):
    # one server, batch size 1, every request one step of D seconds: M/D/1,
    # W = D + rho D / (2 (1 - rho)) (Pollaczek-Khinchine with zero service variance)
    D = 1.0
    recs = simulate(_poisson(rho / D, 40000, seed=1), lambda b: D, ONE_AT_A_TIME)
    theory = D + rho * D / (2 * (1 - rho))
    assert _mean_sojourn(recs) == pytest.approx(theory, rel=0.05)
    # the first token comes at the end of the one step: TTFT is the time in system
    assert all(r["first_token_s"] == r["end_s"] for r in recs[:100])


def test_mm1_time_in_system_is_exponential():
    # service = prefill of an (almost) exponentially long prompt at 1 ms a token: M/M/1 with mu = 1/s,
    # time in system ~ Exp(mu - lambda)
    lam, mean_tokens = 0.6, 1000
    reqs = _poisson(lam, 40000, seed=2, prompt=lambda rng: 1 + int(rng.expovariate(1 / mean_tokens)))
    recs = simulate(reqs, lambda b: b[0].prefill / mean_tokens, ONE_AT_A_TIME)
    mu = 1.0  # E[1 + floor(Exp(1000))] / 1000 = 1.0005
    assert _mean_sojourn(recs) == pytest.approx(1 / (mu - lam), rel=0.06)
    times = [r["end_s"] - r["sent_s"] for r in recs]
    for t in (1.0, 3.0, 6.0):
        assert sum(x > t for x in times) / len(times) == pytest.approx(math.exp(-(mu - lam) * t), abs=0.02)
    # utilization: the server is busy rho of the time
    busy = sum(r.prompt for r in reqs) / mean_tokens
    assert busy / recs[-1]["end_s"] == pytest.approx(lam / mu, rel=0.03)


def test_continuous_batching_step_by_step():
    # two requests at t=0: prompt 3 and 5, outputs 2 and 3; budget 8 tokens; each step 1 s
    seen = []

    def cost(batches):
        seen.append((batches[0].prefill, batches[0].decode, batches[0].seqs))
        return 1.0
    recs = simulate([SimRequest(0.0, 3, 2), SimRequest(0.0, 5, 3)], cost, Limits(max_num_batched_tokens=8))
    # step 1: both prefills (3 + 5 = 8 tokens); then decodes until each has its output
    assert seen == [(8, 0, 2), (0, 2, 2), (0, 1, 1)]
    assert [(r["first_token_s"], r["end_s"], r["output_tokens"]) for r in recs] == [(1.0, 2.0, 2), (1.0, 3.0, 3)]
    # chunked prefill: a budget of 4 splits the 5-token prompt over two steps after the first
    seen.clear()
    recs = simulate([SimRequest(0.0, 3, 1), SimRequest(0.0, 5, 1)], cost, Limits(max_num_batched_tokens=4))
    assert seen == [(4, 0, 2), (4, 0, 1)] and recs[0]["end_s"] == 1.0 and recs[1]["end_s"] == 2.0
    # a request arriving mid-step joins at the next step
    seen.clear()
    recs = simulate([SimRequest(0.0, 2, 3), SimRequest(0.5, 2, 1)], cost, Limits())
    assert seen[:2] == [(2, 0, 1), (2, 1, 2)] and recs[1]["first_token_s"] == 2.0


def test_kv_pool_limits_and_preemption():
    # 4 blocks of 4 tokens: two sequences of 6 prompt + 6 output tokens need 3 blocks each at the end
    def run(kv_blocks):
        steps = []
        recs = simulate([SimRequest(0.0, 6, 6), SimRequest(0.0, 6, 6)],
                        lambda b: steps.append((b[0].prefill, b[0].decode)) or 1.0,
                        Limits(max_num_batched_tokens=64, kv_blocks=kv_blocks, block_size=4))
        assert all(r["code"] == "OK" and r["output_tokens"] == 6 for r in recs)
        return steps, recs
    roomy, _ = run(kv_blocks=6)  # 3 blocks each: both run to the end side by side
    assert roomy == [(12, 0)] + [(0, 2)] * 5
    tight, recs = run(kv_blocks=4)
    # both prefill (2 blocks each, the pool is full), decode to 8 tokens each; the 9th token needs a
    # third block: the last admitted is preempted, its blocks go to the other, which runs to the end;
    # then the victim is recomputed: its prompt and the 3 tokens it had made (9 tokens) in one prefill
    assert tight == [(12, 0), (0, 2), (0, 2), (0, 1), (0, 1), (0, 1), (9, 0), (0, 1), (0, 1)]
    assert sum(p for p, _ in tight) - sum(p for p, _ in roomy) == 9  # the recomputed tokens
    assert [r["end_s"] for r in recs] == [6.0, 9.0]
    # prefix-cache hits skip prefill tokens
    seen = []
    simulate([SimRequest(0.0, 100, 1, cached=96)], lambda b: seen.append(b[0].prefill) or 1.0, Limits())
    assert seen == [4]


def test_closed_loop_and_replicas():
    reqs = [SimRequest(0.0, 1, 1) for _ in range(100)]
    recs = simulate(reqs, lambda b: 1.0, Limits(max_num_seqs=4), concurrency=4, horizon=10.0)
    # 4 in flight, one step each: 4 sent at 0, then 4 more at each completion until t = 10
    assert len(recs) == 40 and summarize(recs)["throughput_rps"] == pytest.approx(4.0, rel=0.1)
    out = simulate_replicas(_poisson(1.0, 200, seed=4), lambda b: 1.5, ONE_AT_A_TIME, replicas=2)
    assert len(out) == 200 and all(r["code"] == "OK" for r in out)


# ---- synthetic profiles with known step laws --------------------------------------------------
TOP_K, LAYERS, HIDDEN, EXPERTS = 4, 4, 256, 16
GATEWAY_THREADS, WORKER_THREADS = 2, 1
HOST = (0.5e-3, 0.2e-3)  # per step, per sequence
DENSE = (1.0e-3, 0.1e-3, 1e-6)  # per step, per token, per context token
LOCAL = (0.3e-3, 0.05e-3)  # experts in the gateway (2 threads): per step, per row
WORKER = (0.6e-3, 0.10e-3)  # one worker (1 thread): per step (twice the gateway's: WORKER_FIXED_RATIO), per row on it (linear thread scaling of LOCAL)
TRANSPORT = {1: (1.0e-3, 0.01e-3), 2: (2.0e-3, 0.01e-3)}  # per step, per row sent


def _truth(W: int, b: Batch) -> float:
    """The step time the synthetic servers follow (one gateway, balanced experts)."""
    rows = b.tokens * TOP_K
    t = HOST[0] + HOST[1] * b.seqs + DENSE[0] + DENSE[1] * b.tokens + DENSE[2] * b.ctx
    if W == 0:
        return t + LOCAL[0] + LOCAL[1] * rows
    return t + WORKER[0] + WORKER[1] * rows / W + TRANSPORT[W][0] + TRANSPORT[W][1] * rows


def _synthetic_report(W: int, rates=(2.0,), seed: int = 0, intervals: int = 60, noise: float = 0.01) -> dict:
    """A `mesh loadtest` report whose server counters follow the laws above: each interval a random
    number of steps with random batches (as Poisson arrivals give), each part with 1% noise."""
    rng = random.Random(seed + W)
    cols = ["t0", "t1", "steps", "seqs", "decode", "prefill", "ctx", "busy_s", "forward_s", "expert_s",
            "worker_max_s", "worker_sum_s"]
    runs = []
    for rate in rates:
        rows_out = []
        for i in range(intervals):
            steps = rng.randint(10, 80)
            seqs = steps * rng.uniform(1.0, 1.0 + rate)
            dec = seqs * rng.uniform(0.6, 0.95)
            pre = (seqs - dec) * rng.uniform(20, 80)
            ctx = dec * rng.uniform(60, 120) + pre * rng.uniform(20, 50)
            rows = (dec + pre) * TOP_K
            n = lambda: rng.uniform(1 - noise, 1 + noise)  # noqa: E731
            host = (HOST[0] * steps + HOST[1] * seqs) * n()
            dense = (DENSE[0] * steps + DENSE[1] * (dec + pre) + DENSE[2] * ctx) * n()
            if W == 0:
                experts, worker = (LOCAL[0] * steps + LOCAL[1] * rows) * n(), 0.0
            else:
                worker = (WORKER[0] * steps + WORKER[1] * rows / W) * n()
                experts = worker + (TRANSPORT[W][0] * steps + TRANSPORT[W][1] * rows) * n()
            fwd = dense + experts
            rows_out.append([i * 0.5, i * 0.5 + 0.5, steps, seqs, dec, pre, ctx, host + fwd, fwd, experts, worker,
                             worker * W])
        runs.append({"rate": rate, "duration_s": 30.0, "throughput_rps": rate, "output_tokens_per_s": rate * 16,
                     "requests": {"sent": 10, "completed": 10, "failed": 0},
                     "profile": {"server_columns": cols, "server_intervals": rows_out, "requests": []}})
    return {"schema": "mesh.loadtest/1", "runs": runs,
            "model": {"num_expert_workers": W, "top_k": TOP_K, "num_layers": LAYERS, "hidden_size": HIDDEN,
                      "num_experts": EXPERTS, "dtype": "float32", "block_size": 16},
            "moe_layers": LAYERS, "expert_load": [[100] * EXPERTS] * LAYERS,
            "server": {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "num_kv_blocks": 4096, "block_size": 16,
                       "stats": {"compute_threads": GATEWAY_THREADS, "worker_threads": WORKER_THREADS if W else 0}},
            "client": {"cores": 2}, "workload": {"prompt_tokens": "64", "output_tokens": "16", "seed": 0}}


BATCHES = [Batch(seqs=1, decode=1, ctx=80, decode_ctx=80), Batch(seqs=6, decode=6, ctx=600, decode_ctx=600),
           Batch(seqs=3, decode=2, prefill=64, ctx=64 * 33 + 200, decode_ctx=200)]


def test_fit_recovers_each_part_from_a_single_rate():
    # one load level is enough: the server's counters separate the parts and the batches vary
    m = build_model([_synthetic_report(0, rates=(2.0,))], calibrate=False)
    s = m.shapes[0]
    assert s.host.coef == pytest.approx(HOST, rel=0.1)
    assert s.dense.coef[1] == pytest.approx(DENSE[1], rel=0.1) and s.dense.coef[0] == pytest.approx(DENSE[0], rel=0.2)
    assert s.dense.coef[2] == pytest.approx(DENSE[1], rel=0.1)  # prefill tokens cost what decode tokens do here
    assert s.experts.coef == pytest.approx(LOCAL, rel=0.15)
    assert s.host.coef[1] > 0  # the per-sequence cost is not lost (a single rate once fitted it as 0)
    for b in BATCHES:
        assert m.cost(Deployment(1, 0))([b]) == pytest.approx(_truth(0, b), rel=0.03)
    assert m.assumptions(Deployment(1, 0)) == []  # the profiled shape rests on measurements alone


def test_a_pool_profile_predicts_the_gateway_without_workers():
    # the failure this model replaces: the 2-worker mesh's step time carried over to --workers 0
    m = build_model([_synthetic_report(2, rates=(2.0, 4.0))], calibrate=False)
    s = m.shapes[2]
    assert s.transport.coef[0] == pytest.approx(TRANSPORT[2][0], rel=0.15)
    assert s.experts.coef[1] == pytest.approx(WORKER[1], rel=0.15)
    for b in BATCHES:
        # experts back in the gateway: no transport, the workers' compute scaled by threads (1 -> 2)
        assert m.cost(Deployment(1, 0))([b]) == pytest.approx(_truth(0, b), rel=0.05)
        assert m.cost(Deployment(1, 2))([b]) == pytest.approx(_truth(2, b), rel=0.03)
    notes = m.assumptions(Deployment(1, 0))
    assert any("thread scaling" in n["assumed"] for n in notes)


def test_a_gateway_profile_predicts_a_pool_within_its_interval():
    m = build_model([_synthetic_report(0, rates=(2.0, 4.0))], calibrate=False)
    dep = Deployment(1, 2)
    notes = m.assumptions(dep)
    assert any(n["what"].startswith("transport") and "gloo" in n["assumed"] for n in notes)  # assumed, and said
    lo, hi = m.with_variant(-1).cost(dep), m.with_variant(1).cost(dep)
    for b in BATCHES:
        assert lo([b]) <= _truth(2, b) <= hi([b])
    # with a pool profiled too, the unprofiled --workers 1 scales the measured transport with ranks
    both = build_model([_synthetic_report(0), _synthetic_report(2, rates=(2.0, 4.0))], calibrate=False)
    for b in BATCHES:
        rows = b.tokens * TOP_K
        # one worker (1 thread, as mesh serve gives it on 2 cores) computes every row; the all-to-alls reach
        # one peer instead of two: half the per-step transport, the same per row
        truth1 = (_truth(0, b) - LOCAL[0] - LOCAL[1] * rows + WORKER[0] + WORKER[1] * rows
                  + TRANSPORT[2][0] / 2 + TRANSPORT[2][1] * rows)
        got = both.cost(Deployment(1, 1))([b])
        assert got == pytest.approx(truth1, rel=0.15)


def test_fit_reports_its_uncertainty_and_range():
    rng = random.Random(3)
    rows = [[1.0, x, x * rng.uniform(0.8, 1.2)] for x in (rng.uniform(1, 5) for _ in range(40))]
    y = [0.5 + 2 * r[1] + 3 * r[2] + rng.gauss(0, 0.05) for r in rows]
    f = fit(("one", "a", "b"), rows, y)
    assert f.coef == pytest.approx([0.5, 2, 3], abs=0.3)
    near, far = [1.0, 3.0, 3.0], [1.0, 30.0, 30.0]
    assert f.se(far) > 5 * f.se(near)  # wider the further from the data
    assert f.outside(near) == [] and f.outside(far) == ["a", "b"]
    with pytest.raises(ValueError, match="measured steps or intervals"):
        fit(("one", "a"), rows[:2], y[:2])
    # steps another process held up: trimmed away, the law stays
    held = [v * (10 if i % 9 == 0 else 1) for i, v in enumerate(y)]
    assert fit(("one", "a", "b"), rows, held, trim=4.0).coef == pytest.approx([0.5, 2, 3], abs=0.3)
    assert fit(("one", "a", "b"), rows, held).coef != pytest.approx([0.5, 2, 3], abs=0.3)


def _planner_model(rates=(2.0, 4.0), W=0) -> MeasuredModel:
    m = build_model([_synthetic_report(W, rates=rates)], calibrate=False)
    m.latency_s = m.shapes[W].latency_s = 2e-3  # what calibration would find outside the engine
    return m


def test_extrapolation_warnings_and_intervals():
    m = _planner_model()
    work = synthetic_workload(Dist.parse("64"), Dist.parse("16"), 300, seed=1)
    inside = plan(m, work, 3.0, Slo(), num_experts=EXPERTS, max_devices=4)
    assert inside["feasible"] and inside["extrapolation"] == [] and inside["assumptions"] == []
    far = plan(m, work, 40.0, Slo(), num_experts=EXPERTS, max_devices=4)
    assert far["feasible"] and any("highest rate" in x for x in far["extrapolation"])
    assert any("sequences per step" in x for x in far["extrapolation"])
    iv = far["interval"]
    for key, q in (("ttft_ms", "p50"), ("tpot_ms", "p50")):
        lo, hi = iv[f"{key}.{q}"]
        assert lo <= far["predicted"][key][q] <= hi and hi > lo
    assert "max_rps_extrapolated" in far
    # a shape nobody profiled: said so, and the transport it rests on is listed as assumed
    pool = plan(m, work, 3.0, Slo(), num_experts=EXPERTS, max_devices=4, pool_sizes=[2])
    assert pool["expert_workers"] == 2
    assert any("--workers 2 was not profiled" in x for x in pool["extrapolation"])
    assert any(a["what"].startswith("transport") for a in pool["assumptions"])


def test_no_margin_without_slos_and_the_percentile_is_kept():
    from router_service.loadtest.cli import _plan_text
    m = _planner_model()
    work = synthetic_workload(Dist.parse("64"), Dist.parse("16"), 300, seed=1)
    free = plan(m, work, 3.0, Slo(), num_experts=EXPERTS, max_devices=4)
    assert free["margin"] is None and free["max_rps_basis"] == "a queue that does not grow"
    text = _plan_text({**free, "hardware": "cpu"})
    assert "margin" not in text.replace("no margin", "") and "no SLOs given" in text
    bound = plan(m, work, 3.0, Slo(ttft_ms=500, tpot_ms=100, percentile=95), num_experts=EXPERTS, max_devices=4)
    assert 0 < bound["margin"] < 1 and bound["predicted"]["at_percentile"]["percentile"] == 95
    text = _plan_text({**bound, "hardware": "cpu"})
    assert "checked at p95" in text and "margin" in text
    json.dumps(bound)  # the whole plan is JSON


def test_more_traffic_never_needs_fewer_machines():
    model = _planner_model()
    work = synthetic_workload(Dist.parse("uniform:64:192"), Dist.parse("32"), 300, seed=1)
    slo = Slo(ttft_ms=150, tpot_ms=30)
    devices = []
    for rps in (5, 10, 20, 40, 60, 80, 120):
        out = plan(model, work, rps, slo, num_experts=16, max_devices=16, find_max_rps=False, with_intervals=False)
        assert out["feasible"], out
        devices.append(out["devices"])
    assert devices == sorted(devices) and devices[0] == 1 and devices[-1] > 2


def test_predict_requests_matches_the_simulation():
    m = _planner_model()
    reqs = [SimRequest(i * 0.2, 64, 16) for i in range(50)]
    p = predict_requests(m, Deployment(1, 0), reqs, Slo(ttft_ms=1000))
    recs = simulate(reqs, m.cost(Deployment(1, 0)), m.limits, latency_s=m.latency_s)
    assert p["ttft_ms"]["p50"] == pytest.approx(summarize(recs)["ttft_ms"]["p50"])
    lo, hi = p["interval"]["tpot_ms.p50"]
    assert lo < p["tpot_ms"]["p50"] < hi


def test_profile_files_hold_every_shape(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"schema": "mesh.profile/1", "shapes": [_synthetic_report(0), _synthetic_report(2)]}))
    reps = load_profile(path)
    assert [r["model"]["num_expert_workers"] for r in reps] == [0, 2]
    assert sorted(build_model(reps, calibrate=False).shapes) == [0, 2]
    old = _synthetic_report(0)
    for run in old["runs"]:
        del run["profile"]["server_intervals"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="server step counters"):
        load_profile(tmp_path / "old.json")


# ---- GPU profiles -------------------------------------------------------------------------------
def _gpu_lines(tmp_path, overhead=3.5e-3, a=1.1, c=18e-6, copy=4.27e12, prefill_tflops=None, mixed=True):
    """bench/gpu_serving.py output whose decode steps follow a known law."""
    dev, shape = hardware.device("h200"), hardware.model("qwen3-coder-30b-a3b")
    probe = GpuProfileModel(dev, shape, copy_bytes_s=copy, overhead_s=overhead, a=a, c=c,
                            f=1 / (prefill_tflops * 1e12) if prefill_tflops else 1 / 200e12)
    lines = [{"bench": "copy", "gpu": "NVIDIA H200", "tb_s": copy / 1e12},
             {"bench": "load", "preset": "coder-30b-a3b"}]
    for b in (1, 16, 64, 256):
        step = probe._step(Batch(seqs=b, decode=b, ctx=b * 512, decode_ctx=b * 512))
        lines.append({"bench": "decode", "batch": b, "ctx": 512, "step_ms": step * 1e3})
    if prefill_tflops:
        for seqs, n in ((1, 512), (1, 2048), (4, 2048)):
            b = Batch(seqs=seqs, prefill=seqs * n, ctx=seqs * n * (n + 1) / 2)
            lines.append({"bench": "prefill", "seqs": seqs, "tokens": seqs * n, "ctx": 0, "step_ms": probe._step(b) * 1e3})
    if mixed:
        reqs = mixed_requests()
        wall = probe._mixed_sim({"requests": 256}, probe.f)
        out = sum(r.output for r in reqs)
        lines.append({"bench": "mixed", "requests": 256, "output_tokens": out,
                      "prompt_tokens": sum(r.prompt for r in reqs), "wall_s": wall, "output_tok_s": out / wall})
    path = tmp_path / "gpu.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_gpu_profile_recovers_its_step_law(tmp_path):
    prof = load_gpu_profile(_gpu_lines(tmp_path, prefill_tflops=150))
    assert prof["model"] == "qwen3-coder-30b-a3b" and prof["gpu"] == "NVIDIA H200"
    m = GpuProfileModel.build(hardware.device("h200"), hardware.model("qwen3-coder-30b-a3b"), prof)
    assert (m.overhead_s, m.a, m.c) == pytest.approx((3.5e-3, 1.1, 18e-6), rel=0.02)
    assert 1 / m.f / 1e12 == pytest.approx(150, rel=0.02)
    check = m.checks["mixed"]
    assert check["lengths_match"] and check["simulated_output_tok_s"] == pytest.approx(
        check["measured_output_tok_s"], rel=0.02)
    # without prefill lines the mixed run calibrates the prefill compute, and that is listed as assumed
    no_prefill = GpuProfileModel.build(hardware.device("h200"), hardware.model("qwen3-coder-30b-a3b"),
                                       load_gpu_profile(_gpu_lines(tmp_path, prefill_tflops=None)))
    assert 1 / no_prefill.f / 1e12 == pytest.approx(200, rel=0.05)
    assert any(n["what"] == "prefill compute" and "mixed run" in n["assumed"]
               for n in no_prefill.assumptions(Deployment(1, 0)))
    with pytest.raises(ValueError, match="not on H100"):
        GpuProfileModel.build(hardware.device("h100"), hardware.model("qwen3-coder-30b-a3b"), prof)
    # another model: the device's constants carry over, and the plan says so
    nxt = GpuProfileModel.build(hardware.device("h200"), hardware.model("qwen3-coder-next"), prof)
    assert not nxt.same_model and any("carried" in n["assumed"] for n in nxt.assumptions(Deployment(1, 2)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bench": "copy", "gpu": "NVIDIA H200", "tb_s": 4.2}\n')
    with pytest.raises(ValueError, match="no decode"):
        load_gpu_profile(bad)


# ---- published figures --------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency, published", [(8, 587), (64, 1837), (96, 2154)])
def test_roofline_matches_published_vllm_throughput(concurrency, published):
    # docs/reference-figures.md: vLLM, Qwen3-Coder-30B-A3B, 1 x H100, code completion (~250 output tokens).
    # Prompt length unpublished: ~1000 tokens assumed. The roofline should land within 25%.
    m = RooflineModel(hardware.device("h100"), hardware.model("qwen3-coder-30b-a3b"))
    dep = Deployment(1, 0)
    reqs = [SimRequest(0.0, 1000, 250) for _ in range(concurrency * 6)]
    recs = simulate(reqs, m.cost(dep), m.limits_for(dep), concurrency=concurrency, horizon=1e9)
    assert summarize(recs)["output_tokens_per_s"] == pytest.approx(published, rel=0.25)


def test_model_shapes_match_published_parameter_counts():
    for name, total, active in (("qwen3-coder-30b-a3b", 30.5e9, 3.3e9), ("qwen3-coder-480b-a35b", 480e9, 35e9)):
        m = hardware.model(name)
        assert m.dense_params + m.routed_params == pytest.approx(total, rel=0.02)
        assert m.active_params == pytest.approx(active, rel=0.05)
    nxt = hardware.model("qwen3-coder-next")
    # the layer mix: 12 gated softmax-attention layers with a KV cache, 36 Gated DeltaNet layers with state
    assert nxt.kv_bytes_per_token == 24 * 1024  # 12 attention layers x 2 x 2 kv heads x 256 x 2 B
    assert nxt.seq_state_bytes == 36 * (32 * 128 * 128 * 4 + 8192 * 3 * 2)  # ~74 MiB per sequence
    assert nxt.dense_params + nxt.routed_params == pytest.approx(80e9, rel=0.02)
    embed = 2 * nxt.vocab * nxt.hidden
    assert nxt.active_params - embed == pytest.approx(3e9, rel=0.1)  # "A3B": active without embeddings
    assert nxt.routed_params * 2 > 141e9  # its experts fit on no single H100 or H200


def test_roofline_plans_more_gpus_for_more_traffic():
    m = RooflineModel(hardware.device("h100"), hardware.model("qwen3-coder-30b-a3b"))
    work = synthetic_workload(Dist.parse("lognormal:1024:0.5"), Dist.parse("lognormal:200:0.5"), 300, seed=2)
    devs = [plan(m, work, rps, Slo(2000, 60), num_experts=128, max_devices=32, find_max_rps=False,
                 with_intervals=False)["devices"] for rps in (2, 8, 30)]
    assert devs == sorted(devs) and devs[-1] > devs[0]


def test_qwen3_coder_next_on_h100s_needs_an_expert_pool():
    m = RooflineModel(hardware.device("h100"), hardware.model("qwen3-coder-next"))
    assert not m.feasible(Deployment(1, 0))  # 155 GB of experts: not on one 80 GB device
    assert not m.feasible(Deployment(1, 2)) and m.feasible(Deployment(1, 3))
    work = synthetic_workload(Dist.parse("lognormal:1024:0.5"), Dist.parse("lognormal:200:0.5"), 300, seed=3)
    out = plan(m, work, 10, Slo(1500, 50), num_experts=512, max_devices=32)
    assert out["feasible"] and out["expert_workers"] >= 3 and out["gateways"] >= 1
    assert (512 + out["redundant_experts"]) % out["expert_workers"] == 0
    assert out["predicted"]["at_percentile"]["ttft_ms"] <= 1500 and out["max_rps"] >= 10
    assert any(a["what"] == "expert all-to-all" for a in out["assumptions"])  # published, not measured
    h200 = RooflineModel(hardware.device("h200"), hardware.model("qwen3-coder-next"))
    assert h200.feasible(Deployment(1, 2))  # 141 GB devices: two hold the experts


def test_the_all_to_all_term_is_the_transport_time_of_the_busiest_rank():
    """Isolate the pooled cost's all-to-all term: two devices equal but for the all-to-all bandwidth
    and latency differ by exactly the transport time, counted from its definition: every MoE layer
    dispatches and combines (2 all-to-alls), each a latency plus the busiest rank's rows of `hidden`
    bf16 values over the bandwidth. Without workers the interconnect costs nothing."""
    from dataclasses import replace
    fast = hardware.device("h100")
    slow = replace(fast, intra_bw=fast.intra_bw / 4, intra_lat=fast.intra_lat + 1e-3)
    shape = hardware.model("qwen3-coder-30b-a3b")
    m_fast, m_slow = RooflineModel(fast, shape), RooflineModel(slow, shape)
    for W in (2, 4):
        dep = Deployment(1, W)
        for b in (Batch(seqs=8, decode=8, decode_ctx=8000), Batch(seqs=2, decode=1, prefill=700, ctx=2e5)):
            rows = b.tokens * shape.top_k
            per_worker = rows * m_fast.imbalance.factor(W, 0, rows) / W
            busiest = max(b.tokens * shape.top_k, per_worker)  # the gateway sends all its rows; a worker gets its share
            nbytes = busiest * shape.hidden * 2
            def transport(dev):
                return shape.moe_layers * 2 * (dev.intra_lat + nbytes / dev.intra_bw)
            got = m_slow.cost(dep)([b]) - m_fast.cost(dep)([b])
            assert got == pytest.approx(transport(slow) - transport(fast), rel=1e-9)
            assert got > 0.2 * m_fast.cost(dep)([b])  # a term that matters, not rounding
    for b in (Batch(seqs=8, decode=8, decode_ctx=8000),):
        assert m_slow.cost(Deployment(1, 0))([b]) == m_fast.cost(Deployment(1, 0))([b])


def test_redundant_experts_even_out_a_skewed_load():
    rng = random.Random(0)
    load = [[rng.paretovariate(1.2) * 100 for _ in range(16)] for _ in range(4)]
    imb = Imbalance(load)
    assert imb.static(4, 0) > imb.static(4, 8) >= 1.0
    assert imb.static(1, 0) == 1.0 and Imbalance().static(4, 0) == 1.0
    assert imb.factor(4, 0, rows=100) > imb.factor(4, 0, rows=100000) > 1.0
    assert valid_redundancy(16, 3) == [2, 5, 8] and valid_redundancy(16, 4) == [0, 4, 8]


def test_workload_time_scaling_keeps_the_same_requests():
    w = Workload.trace([(10, 0, 5), (20, 0, 5), (30, 0, 5)], [100.0, 101.0, 103.0])
    # 2 gaps over 3 s: 2/3 request/s as recorded; at 1/s the gaps shrink by 2/3, at 3/s by 2/9
    assert [r.arrival for r in w.at(1.0)] == pytest.approx([0.0, 2 / 3, 2.0])
    assert [r.arrival for r in w.at(3.0)] == pytest.approx([0.0, 2 / 9, 2 / 3])
    assert [r.prompt for r in w.at(2.0)] == [10, 20, 30]
