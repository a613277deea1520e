"""`mesh profile` and `mesh plan --validate` end to end on this machine: real `mesh serve` processes
(the tiny preset) on free loopback ports, started and stopped by the commands themselves."""

from __future__ import annotations

import json

from router_service.loadtest.cli import main as cli_main


def test_profile_then_plan_validate_on_the_tiny_preset(tmp_path, capsys):
    from mesh.presets import init_model
    model = init_model("qwen3_moe", "tiny", tmp_path / "tiny")
    out = tmp_path / "profile.json"
    assert cli_main(["profile", "--workers", "0", "--model", str(model), "--serve-args",
                     "--dtype float32 --kv-cache-memory 16M", "--env", "OMP_NUM_THREADS=1", "--rates", "4,8",
                     "--duration", "3", "--prompt-tokens", "16", "--output-tokens", "8", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "--workers 0: 2 levels" in printed.out
    doc = json.loads(out.read_text())
    assert doc["schema"] == "mesh.profile/1" and len(doc["shapes"]) == 1
    shape = doc["shapes"][0]
    assert [r["rate"] for r in shape["runs"]] == [4, 8] and shape["launch"]["workers"] == 0
    assert shape["launch"]["env"] == {"OMP_NUM_THREADS": "1"}
    assert all(r["profile"]["server_intervals"] for r in shape["runs"])

    assert cli_main(["plan", "--profile", str(out), "--target-rps", "6", "--max-devices", "2", "--requests", "200",
                     "--validate", "--validate-duration", "3", "--validate-out", str(tmp_path / "v"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["feasible"] and plan["gateways"] == 1 and plan["expert_workers"] == 0
    v = plan["validation"]
    assert v["ran"] and v["deployment"]["expert_workers"] == 0 and v["rate"] == 6
    rows = {r["key"]: r for r in v["rows"]}
    assert set(rows) == {"ttft_ms.p50", "ttft_ms.p90", "tpot_ms.p50", "tpot_ms.p90", "throughput_rps",
                         "output_tokens_per_s", "goodput_rps"}
    for r in rows.values():
        assert r["predicted"] > 0 and r["measured"] > 0
        assert r["error_pct"] == (r["predicted"] / r["measured"] - 1) * 100
    # the validation ran exactly the requests it predicted for
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["runs"][0]["requests"]["sent"] == v["requests"]
    # throughput is set by the arrivals when the server keeps up: the prediction cannot be far off
    assert abs(rows["throughput_rps"]["error_pct"]) < 25
