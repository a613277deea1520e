"""The planner: the simulator against closed-form queueing results (M/D/1, M/M/1), continuous
batching arithmetic, the step-time fit, the roofline against published serving figures, the
deployment search's monotonicity (more traffic never needs fewer machines) and hardware-only plans."""

from __future__ import annotations

import math
import random

import pytest

from mesh.plan import hardware
from mesh.plan.metrics import summarize
from mesh.plan.perfmodel import (Deployment, Imbalance, MeasuredModel, RooflineModel, StepFit, fit_step_time,
                                 valid_redundancy)
from mesh.plan.planner import plan, synthetic_workload
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
    recs = simulate([SimRequest(0.0, 6, 6), SimRequest(0.0, 6, 6)], lambda b: 1.0,
                    Limits(max_num_batched_tokens=64, kv_blocks=4, block_size=4))
    assert all(r["code"] == "OK" and r["output_tokens"] == 6 for r in recs)
    assert max(r["end_s"] for r in recs) > 7  # one had to wait or be recomputed
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


def test_step_time_fit_recovers_known_costs():
    truth = StepFit(0.004, 0.0008, 0.00012, 2e-8)
    rng = random.Random(0)
    intervals = []
    for i in range(60):
        steps = rng.randint(20, 200)
        dec = steps * rng.uniform(1, 12)
        pre = rng.uniform(0, 3000)
        ctx = pre * rng.uniform(50, 200) + dec * 300
        busy = truth(Batch(decode=dec, prefill=pre, ctx=ctx)) - truth.step_s + truth.step_s * steps
        intervals.append([i, i + 1, busy * rng.uniform(0.99, 1.01), steps, dec, pre, ctx])
    fit = fit_step_time(intervals)
    assert fit.step_s == pytest.approx(truth.step_s, rel=0.1)
    assert fit.decode_s == pytest.approx(truth.decode_s, rel=0.1)
    assert fit.prefill_s == pytest.approx(truth.prefill_s, rel=0.15)
    assert fit.residual < 0.02
    with pytest.raises(ValueError, match="busy intervals"):
        fit_step_time(intervals[:2])


@pytest.mark.parametrize("concurrency, published", [(8, 587), (64, 1837), (96, 2154)])
def test_roofline_matches_published_vllm_throughput(concurrency, published):
    # MODELS.md: vLLM, Qwen3-Coder-30B-A3B, 1 x H100, code completion (~250 output tokens).
    # Prompt length unpublished: ~1000 tokens assumed. The roofline should land within 25%.
    m = RooflineModel(hardware.device("h100"), hardware.model("qwen3-coder-30b-a3b"))
    dep = Deployment(1, 0)
    reqs = [SimRequest(0.0, 1000, 250) for _ in range(concurrency * 6)]
    recs = simulate(reqs, m.cost(dep), m.limits_for(dep), concurrency=concurrency, horizon=1e9)
    assert summarize(recs)["output_tokens_per_s"] == pytest.approx(published, rel=0.25)


def test_model_shapes_match_published_parameter_counts():
    for name, active in (("qwen3-coder-30b-a3b", 3.3e9), ("qwen3-coder-480b-a35b", 35e9)):
        assert hardware.model(name).active_params == pytest.approx(active, rel=0.05)
    nxt = hardware.model("qwen3-coder-next")
    assert nxt.kv_bytes_per_token == 24 * 1024  # 12 attention layers x 2 x 256 x 2 x 2 B
    assert nxt.routed_params * 2 > 141e9  # its experts fit on no single H100 or H200


def _measured(**kw) -> MeasuredModel:
    return MeasuredModel(fit=StepFit(0.004, 0.001, 0.0002), limits=Limits(), moe_layers=4, top_k=2, hidden=256,
                         num_experts=16, **kw)


def test_more_traffic_never_needs_fewer_machines():
    model = _measured()
    work = synthetic_workload(Dist.parse("uniform:64:192"), Dist.parse("32"), 300, seed=1)
    slo = Slo(ttft_ms=150, tpot_ms=30)
    devices = []
    for rps in (5, 10, 20, 40, 60, 80, 120):
        out = plan(model, work, rps, slo, num_experts=16, max_devices=16, find_max_rps=False)
        assert out["feasible"], out
        devices.append(out["devices"])
    assert devices == sorted(devices) and devices[0] == 1 and devices[-1] > 2


def test_roofline_plans_more_gpus_for_more_traffic():
    m = RooflineModel(hardware.device("h100"), hardware.model("qwen3-coder-30b-a3b"))
    work = synthetic_workload(Dist.parse("lognormal:1024:0.5"), Dist.parse("lognormal:200:0.5"), 300, seed=2)
    devs = [plan(m, work, rps, Slo(2000, 60), num_experts=128, max_devices=32, find_max_rps=False)["devices"]
            for rps in (2, 8, 30)]
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
    h200 = RooflineModel(hardware.device("h200"), hardware.model("qwen3-coder-next"))
    assert h200.feasible(Deployment(1, 2))  # 141 GB devices: two hold the experts


def test_redundant_experts_even_out_a_skewed_load():
    rng = random.Random(0)
    load = [[rng.paretovariate(1.2) * 100 for _ in range(16)] for _ in range(4)]
    imb = Imbalance(load)
    assert imb.static(4, 0) > imb.static(4, 8) >= 1.0
    assert imb.static(1, 0) == 1.0 and Imbalance().static(4, 0) == 1.0
    assert imb.factor(4, 0, rows=100) > imb.factor(4, 0, rows=100000) > 1.0
    assert valid_redundancy(16, 3) == [2, 5, 8] and valid_redundancy(16, 4) == [0, 4, 8]


def test_expert_pool_costs_dispatch_on_the_measured_model():
    model = _measured(expert_share=0.4)
    b = [Batch(seqs=8, decode=8, ctx=800)]
    local = model.cost(Deployment(1, 0))(b)
    pooled = model.cost(Deployment(1, 2))(b)
    # the pool takes the expert share off the gateway, then adds 2 all-to-alls per MoE layer
    assert pooled > local - 0.4 * model.fit.prefill_s * 8
    assert model.cost(Deployment(2, 2))([b[0], b[0]]) >= pooled


def test_workload_time_scaling_keeps_the_same_requests():
    w = Workload.trace([(10, 0, 5), (20, 0, 5), (30, 0, 5)], [100.0, 101.0, 103.0])
    # 2 gaps over 3 s: 2/3 request/s as recorded; at 1/s the gaps shrink by 2/3, at 3/s by 2/9
    assert [r.arrival for r in w.at(1.0)] == pytest.approx([0.0, 2 / 3, 2.0])
    assert [r.arrival for r in w.at(3.0)] == pytest.approx([0.0, 2 / 9, 2 / 3])
    assert [r.prompt for r in w.at(2.0)] == [10, 20, 30]
