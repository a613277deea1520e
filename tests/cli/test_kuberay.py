"""`mesh deploy kuberay`: the manifest rendered from a plan uses KubeRay's RayCluster (ray.io/v1) field
names, carries the plan's shape into the pods, and the checked-in example is what the command renders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from mesh.kuberay import render, to_yaml

# Field names of the RayCluster CRD (ray.io/v1) that a manifest may use at each level.
SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
        "suspend", "managedBy", "gcsFaultToleranceOptions", "headServiceAnnotations"}
AUTOSCALER = {"upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "env", "envFrom",
              "securityContext", "volumeMounts", "version"}
HEAD = {"serviceType", "rayStartParams", "template", "enableIngress", "headService", "suspend"}
WORKER = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "scaleStrategy",
          "numOfHosts", "suspend", "idleTimeoutSeconds"}
CONTAINER = {"name", "image", "command", "args", "ports", "resources", "readinessProbe", "livenessProbe", "env",
             "volumeMounts", "imagePullPolicy", "lifecycle"}


def _check(obj: dict) -> None:
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayCluster"
    spec = obj["spec"]
    assert set(spec) <= SPEC, set(spec) - SPEC
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert set(spec["headGroupSpec"]) <= HEAD
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER, set(g) - WORKER
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
    for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for c in tmpl["spec"]["containers"]:
            assert set(c) <= CONTAINER, set(c) - CONTAINER


def test_render_carries_the_plan():
    plan = {"feasible": True, "hardware": "cpu", "gateways": 1, "expert_workers": 3, "redundant_experts": 2}
    [obj] = render(plan, image="img:1", model="Qwen/Qwen3-Coder-30B-A3B-Instruct", max_workers=5)
    _check(obj)
    [group] = obj["spec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 5)
    head = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    cmd = head["args"][0]
    assert "--workers 3" in cmd and "--redundant-experts 2" in cmd and "--ray-address auto" in cmd
    assert "ray start --head --num-cpus=0" in cmd and "--admin-token-file" in cmd
    assert {p["containerPort"] for p in head["ports"]} >= {50051, 8000, 6379}
    assert obj["spec"]["enableInTreeAutoscaling"] is True
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    # GPUs and several gateways: one RayCluster per gateway, a GPU per pod
    objs = render({**plan, "hardware": "h200", "gateways": 2}, image="img:1", model="m")
    assert [o["metadata"]["name"] for o in objs] == ["moe-mesh-0", "moe-mesh-1"]
    for o in objs:
        _check(o)
        w = o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert w["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "--device cuda" in o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]
    # experts in the gateway: no worker group
    [o] = render({**plan, "expert_workers": 0, "redundant_experts": 0}, image="i", model="m")
    assert o["spec"]["workerGroupSpecs"] == [] and "--redundant-experts" not in str(o)
    with pytest.raises(ValueError, match="not feasible"):
        render({"feasible": False, "reason": "too slow"}, image="i", model="m")
    with pytest.raises(ValueError, match="lacks expert_workers"):
        render({"feasible": True, "gateways": 1, "redundant_experts": 0}, image="i", model="m")


def test_cli_renders_the_checked_in_example(tmp_path):
    example = ROOT / "infra" / "kuberay"
    out = tmp_path / "rc.yaml"
    run = subprocess.run([sys.executable, "-m", "mesh_cli", "deploy", "kuberay", "--plan",
                          str(example / "example-plan.json"), "--image", "moe-mesh:0.1.0", "--max-workers", "6",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == (example / "raycluster.yaml").read_text()
    for obj in yaml.safe_load_all(out.read_text()):
        _check(obj)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    run = subprocess.run([sys.executable, "-m", "mesh_cli", "deploy", "kuberay", "--plan", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode != 0 and "--plan" in run.stderr and "not JSON" in run.stderr
    bad.write_text(json.dumps({"feasible": False, "reason": "no shape meets the SLOs"}))
    run = subprocess.run([sys.executable, "-m", "mesh_cli", "deploy", "kuberay", "--plan", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode != 0 and "not feasible" in run.stderr and "Traceback" not in run.stderr
    assert to_yaml([]) == ""
