"""`mesh deploy kuberay --plan plan.json`: a KubeRay RayCluster manifest for the deployment `mesh plan`
recommended.

Per gateway of the plan one RayCluster: the head pod runs the gateway (`ray start --head` with no CPUs
for Ray tasks, then `mesh serve --ray-address auto --workers W`), the `experts` worker group holds
the expert workers (one Ray node per worker, each with the CPUs, or the GPU, an expert actor asks
for). In-tree autoscaling is on: the pool's placement group asks Ray for the workers' bundles, and
KubeRay's autoscaler adds `experts` pods up to maxReplicas to place them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GRPC_PORT, HTTP_PORT = 50051, 8000
ADMIN_TOKEN_PATH = "/etc/mesh/admin/token"


def _resources(cpus: str, memory: str, gpus: int) -> dict:
    limits = {"cpu": cpus, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": dict(limits), "limits": dict(limits)}


def render(plan: dict, *, image: str, model: str, name: str = "moe-mesh", gateway_cpus: str = "4",
           gateway_memory: str = "16Gi", worker_cpus: str = "2", worker_memory: str = "8Gi",
           max_workers: int | None = None, admin_secret: str = "mesh-admin-token",
           ray_version: str = "2.60.0") -> list[dict]:
    """The RayCluster objects (one per gateway) for `plan` (mesh plan --json output)."""
    if not plan.get("feasible", True):
        raise ValueError(f"the plan is not feasible ({plan.get('reason', 'no reason given')}): nothing to deploy")
    missing = [k for k in ("gateways", "expert_workers", "redundant_experts") if plan.get(k) is None]
    if missing:
        raise ValueError(f"the plan lacks {', '.join(missing)}: give the JSON that `mesh plan --json` prints")
    gateways, workers, redundant = int(plan["gateways"]), int(plan["expert_workers"]), int(plan["redundant_experts"])
    if gateways < 1 or workers < 0 or redundant < 0:
        raise ValueError(f"the plan has {gateways} gateways, {workers} expert workers, {redundant} redundant experts")
    max_workers = max(workers, max_workers or workers)
    gpu = str(plan.get("hardware", "cpu")).lower() not in ("cpu", "")
    serve = [f"mesh serve --model {model} --ray-address auto --host 0.0.0.0 --port {GRPC_PORT} "
             f"--http-port {HTTP_PORT} --workers {workers}"]
    if workers and redundant:
        serve.append(f"--redundant-experts {redundant}")
    serve.append(f"--admin-token-file {ADMIN_TOKEN_PATH}")
    if gpu:
        serve.append("--device cuda")
    start = "ray start --head --num-cpus=0 --num-gpus=0 --dashboard-host=0.0.0.0 --disable-usage-stats"
    head_container = {
        "name": "gateway", "image": image,
        "command": ["/bin/bash", "-lc", "--"],
        "args": [f"{start} && exec {' '.join(serve)}"],
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": GRPC_PORT, "name": "grpc"},
                  {"containerPort": HTTP_PORT, "name": "http"}],
        "resources": _resources(gateway_cpus, gateway_memory, 1 if gpu else 0),
        "readinessProbe": {"grpc": {"port": GRPC_PORT}, "periodSeconds": 5, "failureThreshold": 120},
        "volumeMounts": [{"name": "admin-token", "mountPath": str(Path(ADMIN_TOKEN_PATH).parent), "readOnly": True}],
    }
    worker_container = {
        "name": "expert-worker", "image": image,
        "resources": _resources(worker_cpus, worker_memory, 1 if gpu else 0),
    }
    out = []
    for g in range(gateways):
        cluster = name if gateways == 1 else f"{name}-{g}"
        spec = {
            "rayVersion": ray_version,
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                "rayStartParams": {},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "moe-mesh", "moe-mesh/role": "gateway"}},
                    "spec": {"containers": [head_container],
                             "volumes": [{"name": "admin-token", "secret": {"secretName": admin_secret}}]},
                },
            },
            "workerGroupSpecs": [] if not workers else [{
                "groupName": "experts",
                "replicas": workers, "minReplicas": workers, "maxReplicas": max_workers,
                "rayStartParams": {},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "moe-mesh", "moe-mesh/role": "expert-worker"}},
                    "spec": {"containers": [worker_container]},
                },
            }],
        }
        out.append({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                    "metadata": {"name": cluster, "labels": {"app.kubernetes.io/name": "moe-mesh"},
                                 # the head container's command replaces KubeRay's generated `ray start`
                                 "annotations": {"ray.io/overwrite-container-cmd": "true"}},
                    "spec": spec})
    return out


def to_yaml(objects: list[dict]) -> str:
    import yaml
    return yaml.safe_dump_all(objects, sort_keys=False)


def register(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="render deployment manifests from a `mesh plan` result")
    sub = p.add_subparsers(dest="deploy_target", required=True, metavar="{kuberay}")
    k = sub.add_parser(
        "kuberay", help="a KubeRay RayCluster per gateway: the gateway on the head, expert workers in a group",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1] + "\nThe admin token comes from the Secret --admin-secret "
                    f"(key `token`, mounted at {ADMIN_TOKEN_PATH}). The image: infra/kuberay/Dockerfile.")
    k.add_argument("--plan", required=True, metavar="FILE", help="the JSON `mesh plan --json` printed")
    k.add_argument("--image", default="moe-mesh:latest", help="container image (default moe-mesh:latest)")
    k.add_argument("--model", default="Qwen/Qwen3-Coder-30B-A3B-Instruct",
                   help="what `mesh serve --model` gets (a Hub id or a path in the image; default "
                        "Qwen/Qwen3-Coder-30B-A3B-Instruct)")
    k.add_argument("--name", default="moe-mesh", help="RayCluster name (default moe-mesh)")
    k.add_argument("--max-workers", type=int, default=None,
                   help="most expert-worker pods the autoscaler may add (default: the plan's count)")
    k.add_argument("--worker-cpus", default="2", help="CPUs per expert-worker pod (default 2)")
    k.add_argument("--worker-memory", default="8Gi", help="memory per expert-worker pod (default 8Gi)")
    k.add_argument("--gateway-cpus", default="4", help="CPUs of the gateway pod (default 4)")
    k.add_argument("--gateway-memory", default="16Gi", help="memory of the gateway pod (default 16Gi)")
    k.add_argument("--admin-secret", default="mesh-admin-token", help="Secret holding the admin token")
    k.add_argument("--out", default=None, metavar="FILE", help="write the manifest here (default: stdout)")
    k.set_defaults(func=cmd_kuberay)


def cmd_kuberay(args) -> int:
    try:
        plan = json.loads(Path(args.plan).read_text())
    except OSError as e:
        raise SystemExit(f"mesh: error: --plan {args.plan}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"mesh: error: --plan {args.plan} is not JSON ({e}): give what `mesh plan --json` prints") from None
    if args.max_workers is not None and args.max_workers < 1:
        raise SystemExit(f"mesh: error: --max-workers must be at least 1, got {args.max_workers}")
    try:
        objects = render(plan, image=args.image, model=args.model, name=args.name, max_workers=args.max_workers,
                         worker_cpus=args.worker_cpus, worker_memory=args.worker_memory,
                         gateway_cpus=args.gateway_cpus, gateway_memory=args.gateway_memory,
                         admin_secret=args.admin_secret)
    except ValueError as e:
        raise SystemExit(f"mesh: error: --plan {args.plan}: {e}") from None
    text = to_yaml(objects)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(objects)} RayCluster(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
