"""`mesh admin status|rebalance|scale|autoscale`: the mesh.v1.Admin calls from the shell.

Every subcommand takes --target (the gateway's gRPC address) and --admin-token-file (the same file
`mesh serve --admin-token-file` read). Output is JSON (the call's answer); errors print
`mesh: error: <CODE>: <details>` and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "admin", help="look at and change a running gateway's expert pool (mesh.v1.Admin)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Operator calls against a running `mesh serve --workers N --admin-token-file FILE`:\n"
                    "  status     the pool: workers, each layer's placement, load per expert, replicas, imbalance\n"
                    "  rebalance  move experts to balance the load of the last load window (--slots-per-rank\n"
                    "             adds or removes replica slots); returns once the pool serves on it\n"
                    "  scale      grow or shrink the pool to --workers N while it serves\n"
                    "  autoscale  turn the policy loop on (--on) or off (--off): rebalancing on imbalance, and\n"
                    "             with --max-workers sizing the pool from tokens per worker, the queue and\n"
                    "             TTFT/TPOT SLOs\n"
                    "Every call carries the admin token; without it the gateway answers UNAUTHENTICATED.")
    sub = p.add_subparsers(dest="admin_command", required=True, metavar="{status,rebalance,scale,autoscale}")

    def common(sp):
        sp.add_argument("--target", default=os.environ.get("MESH_TARGET", "127.0.0.1:50051"),
                        help="the gateway's gRPC address (default 127.0.0.1:50051; env MESH_TARGET)")
        sp.add_argument("--admin-token-file", default=os.environ.get("MESH_ADMIN_TOKEN_FILE"),
                        help="file holding the admin token (env MESH_ADMIN_TOKEN_FILE)")
        sp.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the answer (default 600: a rebalance loads weights)")
        sp.set_defaults(func=cmd_admin)

    common(sub.add_parser("status", help="print the pool as JSON"))
    rb = sub.add_parser("rebalance", help="rebalance the pool now")
    rb.add_argument("--slots-per-rank", type=int, default=0,
                    help="slots per worker afterwards (more: add replicas; fewer: remove them; default: as now)")
    common(rb)
    sc = sub.add_parser("scale", help="change the number of expert workers")
    sc.add_argument("--workers", type=int, required=True, help="expert workers wanted")
    common(sc)
    au = sub.add_parser("autoscale", help="configure the rebalancing policy")
    onoff = au.add_mutually_exclusive_group(required=True)
    onoff.add_argument("--on", dest="enabled", action="store_true", help="turn the policy on")
    onoff.add_argument("--off", dest="enabled", action="store_false", help="turn the policy off")
    au.add_argument("--imbalance-threshold", type=float, default=0.0,
                    help="rebalance when max/mean rows per worker stays above this (e.g. 1.3; default: as now)")
    au.add_argument("--look-back-period-s", type=float, default=0.0,
                    help="load window and how long the imbalance must last, seconds (default: as now)")
    au.add_argument("--interval-s", type=float, default=0.0, help="seconds between checks (default: as now)")
    au.add_argument("--min-workers", type=int, default=0, help="fewest workers sizing keeps (default: as now)")
    au.add_argument("--max-workers", type=int, default=0, help="most workers sizing adds (default: as now; "
                                                                  "sizing is off until set)")
    au.add_argument("--target-tokens-per-worker", type=float, default=0.0,
                    help="routed tokens per second each worker should serve (default: as now)")
    au.add_argument("--upscale-delay-s", type=float, default=0.0,
                    help="seconds more workers must be wanted before adding them (default: as now)")
    au.add_argument("--downscale-delay-s", type=float, default=0.0,
                    help="seconds fewer workers must be wanted before removing some (default: as now)")
    au.add_argument("--max-queue-per-worker", type=float, default=None,
                    help="add a worker while more requests than this per worker wait for a batch slot "
                         "(0: do not watch; default: as now)")
    au.add_argument("--ttft-slo-ms", type=float, default=None,
                    help="add a worker while the p90 time to first token over the look-back period is above "
                         "this (0: do not watch; default: as now)")
    au.add_argument("--tpot-slo-ms", type=float, default=None,
                    help="add a worker while the p90 time per output token over the look-back period is above "
                         "this (0: do not watch; default: as now)")
    common(au)


def cmd_admin(args) -> int:
    from router_service.admin import token_from_flag
    from router_service.client import MeshClient, MeshError
    token = token_from_flag(args.admin_token_file)
    if args.admin_command == "rebalance" and args.slots_per_rank < 0:
        raise SystemExit(f"mesh: error: --slots-per-rank must be 0 or more, got {args.slots_per_rank}")
    if args.admin_command == "scale" and args.workers < 1:
        raise SystemExit(f"mesh: error: --workers must be at least 1, got {args.workers}")
    with MeshClient(args.target, timeout=args.timeout, admin_token=token) as client:
        try:
            if args.admin_command == "status":
                out = client.get_pool()
            elif args.admin_command == "rebalance":
                print(f"rebalancing the pool on {args.target} ...", file=sys.stderr)
                out = client.rebalance(args.slots_per_rank)
            elif args.admin_command == "scale":
                print(f"scaling the pool on {args.target} to {args.workers} workers ...", file=sys.stderr)
                out = client.scale_pool(args.workers)
            else:
                for flag in ("min_workers", "max_workers", "target_tokens_per_worker", "upscale_delay_s",
                             "downscale_delay_s", "imbalance_threshold", "look_back_period_s", "interval_s",
                             "max_queue_per_worker", "ttft_slo_ms", "tpot_slo_ms"):
                    if (getattr(args, flag) or 0) < 0:
                        raise SystemExit(f"mesh: error: --{flag.replace('_', '-')} must be 0 or more")
                ms = lambda v: None if v is None else v / 1e3  # noqa: E731
                out = client.set_autoscaling(args.enabled, args.imbalance_threshold, args.look_back_period_s,
                                             args.interval_s, args.min_workers, args.max_workers,
                                             args.target_tokens_per_worker, args.upscale_delay_s,
                                             args.downscale_delay_s, args.max_queue_per_worker,
                                             ms(args.ttft_slo_ms), ms(args.tpot_slo_ms))
        except MeshError as e:
            print(f"mesh: error: {e.code.name}: {e.details}", file=sys.stderr)
            return 1
    print(json.dumps(out, indent=1))
    return 0
