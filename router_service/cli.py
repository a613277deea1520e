"""`mesh serve`: registered into the `mesh` command by mesh_cli; builds on the core's engine flags (mesh.cli)."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("mesh.serve")

from router_service import DEFAULT_GRACE, DEFAULT_HOST, DEFAULT_MAX_QUEUED, DEFAULT_PORT


def _env(name: str, default=None):
    return os.environ.get(name, default)


def register(subparsers) -> None:
    # String defaults from MESH_* go through `type` like typed flags, so a bad value is a usage error.
    from mesh.cli import add_engine_flags
    p = subparsers.add_parser(
        "serve", help="serve a model over gRPC (mesh.v1.Inference, health, reflection) and, with --http-port, "
                      "the OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model over gRPC: mesh.v1.Inference (Generate, Complete, Tokenize, "
                    "GetModelInfo), the standard grpc.health.v1 health service and server reflection.\n"
                    "With --http-port, also the OpenAI-compatible HTTP API: POST /v1/completions, POST "
                    "/v1/chat/completions (both streaming with \"stream\": true), GET /v1/models, GET /health.\n"
                    "Both protocols take the tenant from the x-tenant-id header, or with --auth-tokens-file from the "
                    "caller's bearer token (tenants never share cached "
                    "prefixes) and write one access-log line per request.\n"
                    "Health reports NOT_SERVING until the model (and all expert workers) are loaded, and "
                    "again while draining.\nSIGTERM or SIGINT drains: new requests get UNAVAILABLE, "
                    "in-flight ones get --grace-period seconds to finish, the rest are aborted; a second "
                    "signal aborts at once.\nIf the engine dies while serving (an expert worker lost), "
                    "requests get UNAVAILABLE and the server exits with code 1 for its supervisor to "
                    "restart it.")
    p.add_argument("--model", default=None,
                   help="model directory in HF format, or a Hugging Face Hub id such as "
                        "Qwen/Qwen3-Coder-30B-A3B-Instruct (fetched into the Hugging Face cache; HF_HUB_OFFLINE=1 "
                        "uses the cache only) (env MESH_MODEL; default: the built-in model)")
    p.add_argument("--http-port", type=int, default=_env("MESH_HTTP_PORT"),
                   help="also serve the OpenAI-compatible HTTP API on this port, on --host; 0 picks a free one "
                        "(default: off; env MESH_HTTP_PORT)")
    p.add_argument("--served-model-name", default=_env("MESH_SERVED_MODEL_NAME"),
                   help="the model id of the HTTP API (GET /v1/models; requests must name it) (default: the Hub "
                        "id, or the model directory's name; env MESH_SERVED_MODEL_NAME)")
    p.add_argument("--workers", type=int, default=_env("MESH_WORKERS", "0"),
                   help="expert worker processes (Ray actors) holding the experts; 0 = all experts in "
                        "this process (default 0; env MESH_WORKERS)")
    p.add_argument("--redundant-experts", type=int, default=_env("MESH_REDUNDANT_EXPERTS", "0"),
                   help="extra expert slots per MoE layer holding replicas of experts (hot ones after a "
                        "rebalance), spread over the workers; rounded up so every worker holds the same number "
                        "of slots. Any number of experts runs on any --workers: when the workers do not divide "
                        "the experts the spare slots hold replicas (default 0; env MESH_REDUNDANT_EXPERTS; used "
                        "with --workers >= 1)")
    p.add_argument("--admin-token-file", default=_env("MESH_ADMIN_TOKEN_FILE"),
                   help="file holding the token that mesh.v1.Admin calls (mesh admin ...) must carry in the "
                        "x-admin-token metadata; without it every Admin call is refused UNAUTHENTICATED "
                        "(env MESH_ADMIN_TOKEN_FILE)")
    p.add_argument("--join", default=_env("MESH_JOIN"), metavar="HOST:PORT",
                   help="serve from the expert pool of the gateway at HOST:PORT (started with --workers N and "
                        "--admin-token-file) instead of starting workers: its workers also serve this gateway, "
                        "each gateway on a group of its own; give the same --model and --admin-token-file "
                        "(env MESH_JOIN; CPU pools)")
    p.add_argument("--ray-address", default=_env("MESH_RAY_ADDRESS"),
                   help="Ray cluster to start expert workers in, e.g. ray://head:10001 or auto "
                        "(default: a local Ray instance; env MESH_RAY_ADDRESS; used with --workers >= 1)")
    p.add_argument("--redis", default=_env("MESH_REDIS_URL"),
                   help="Redis for the shared prefix cache, redis://[:PASSWORD@]HOST:PORT/DB or rediss://... "
                        "(env MESH_REDIS_URL; default: the local block pool only)")
    p.add_argument("--redis-timeout-ms", type=float, default=_env("MESH_REDIS_TIMEOUT_MS", "250"),
                   help="bound on each Redis call; a slower Redis is treated as a miss (default 250)")
    p.add_argument("--redis-ttl", type=int, default=_env("MESH_REDIS_TTL", str(24 * 3600)),
                   help="seconds a cached block lives in Redis (default 86400)")
    p.add_argument("--metrics-port", type=int, default=_env("MESH_METRICS_PORT"),
                   help="expose Prometheus metrics on this port (/metrics); tracing is configured by the "
                        "standard OTEL_* variables, e.g. OTEL_EXPORTER_OTLP_ENDPOINT (env MESH_METRICS_PORT)")
    p.add_argument("--host", default=_env("MESH_HOST", DEFAULT_HOST),
                   help=f"address to listen on; 0.0.0.0 for all interfaces (default {DEFAULT_HOST}; "
                        "env MESH_HOST)")
    p.add_argument("--port", type=int, default=_env("MESH_PORT", str(DEFAULT_PORT)),
                   help=f"port to listen on; 0 picks a free one (default {DEFAULT_PORT}; env MESH_PORT)")
    p.add_argument("--max-queued-requests", type=int,
                   default=_env("MESH_MAX_QUEUED_REQUESTS", str(DEFAULT_MAX_QUEUED)),
                   help="most requests admitted at once (running + waiting); more get RESOURCE_EXHAUSTED "
                        f"(default {DEFAULT_MAX_QUEUED}; env MESH_MAX_QUEUED_REQUESTS)")
    p.add_argument("--grace-period", type=float, default=_env("MESH_GRACE_PERIOD", str(DEFAULT_GRACE)),
                   help="seconds in-flight requests get to finish on shutdown before they are aborted "
                        f"(default {DEFAULT_GRACE:g}; env MESH_GRACE_PERIOD)")
    sec = p.add_argument_group("security (without these flags the ports are open and in plain text)")
    sec.add_argument("--auth-tokens-file", default=_env("MESH_AUTH_TOKENS_FILE"),
                     help="require 'authorization: Bearer <token>' on every inference call (gRPC and HTTP; health "
                          "stays open); the file maps tokens to tenants and roles, one 'TOKEN TENANT [ROLE]' per "
                          "line (ROLE: admin or user, default user; TOKEN may be sha256:<hex digest>). The tenant "
                          "then comes from the token and x-tenant-id is ignored (env MESH_AUTH_TOKENS_FILE)")
    sec.add_argument("--tls-cert", default=_env("MESH_TLS_CERT"),
                     help="serve gRPC (and --http-port) over TLS with this certificate chain, PEM (env MESH_TLS_CERT)")
    sec.add_argument("--tls-key", default=_env("MESH_TLS_KEY"),
                     help="the private key of --tls-cert, PEM (env MESH_TLS_KEY)")
    sec.add_argument("--tls-client-ca", default=_env("MESH_TLS_CLIENT_CA"),
                     help="mutual TLS: require client certificates signed by this CA, PEM (env MESH_TLS_CLIENT_CA)")
    p.add_argument("--log-level", default=_env("MESH_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level; INFO includes one access line per request (default INFO; env MESH_LOG_LEVEL)")
    p.add_argument("--log-format", default=_env("MESH_LOG_FORMAT", "text"), choices=["text", "json"],
                   help="text lines, or one JSON object per line (access lines with their fields) (default "
                        "text; env MESH_LOG_FORMAT)")
    add_engine_flags(p)
    p.set_defaults(func=cmd_serve)


def build_engine_factory(args):
    """What `mesh serve` runs: (factory, ready, on_shutdown, pool), `pool` the expert pool (None with
    --workers 0) that the Admin API reshapes. The factory builds the engine once, in a
    background thread, after the port is open.

    --workers 0: the single-process engine (all experts here). --workers N: the experts live in N Ray
    actors (a private local Ray cluster, or --ray-address), reached over a torch.distributed group;
    health turns SERVING once every worker has loaded its shard and joined. --redis adds the shared
    prefix-cache tier."""
    from mesh.cli import engine_config
    from router_service.hub import resolve_model
    if args.workers < 0:
        raise SystemExit(f"mesh: error: --workers must be 0 or more, got {args.workers}")
    if args.redundant_experts < 0:
        raise SystemExit(f"mesh: error: --redundant-experts must be 0 or more, got {args.redundant_experts}")
    if args.join and (args.workers or args.redundant_experts or args.ray_address):
        raise SystemExit("mesh: error: --join serves from another gateway's expert pool: drop --workers, "
                         "--redundant-experts and --ray-address (the pool's owner has them)")
    if args.join and ":" not in args.join:
        raise SystemExit(f"mesh: error: --join: expected HOST:PORT of the pool's gateway, got {args.join!r}")
    if args.redundant_experts and args.workers == 0:
        raise SystemExit("mesh: error: --redundant-experts needs --workers >= 1 (with --workers 0 every expert "
                         "lives once in the gateway)")
    model = resolve_model(args.model, args.load_format, args.revision)
    args.resolved_model = model
    config = engine_config(args)
    tier = None
    if args.redis:
        from router_service.redis_tier import RedisTier, redact
        try:
            tier = RedisTier(args.redis, timeout_s=args.redis_timeout_ms / 1000, ttl_s=args.redis_ttl)
        except ValueError as e:
            raise SystemExit(f"mesh: error: {e}") from None
        log.info("prefix cache: local pool + redis %s (%s)", redact(args.redis),
                 "reachable" if tier.ping() else "NOT reachable: serving without it until it answers")
    pool = None
    if args.workers > 0:
        from expert_workers.pool import ExpertPool
        try:
            pool = ExpertPool(str(model), config.dtype, args.workers, ray_address=args.ray_address,
                              device=config.device, backend=config.backend, load_format=config.load_format,
                              redundant=args.redundant_experts)
        except ValueError as e:
            raise SystemExit(f"mesh: error: {e}") from None

    joined = None
    if args.join:
        from router_service.admin import token_from_flag
        from router_service.join import JoinedPool
        try:
            joined = JoinedPool(args.join, token_from_flag(args.admin_token_file), str(model), config.dtype,
                                device=config.device)
        except ValueError as e:
            raise SystemExit(f"mesh: error: --join: {e}") from None

    def factory():
        from mesh.engine.engine import Engine
        dispatcher = pool.start() if pool is not None else joined.start() if joined is not None else None
        return Engine(model, config, dispatcher=dispatcher, prefix_tier=tier)

    # The hooks below block on Ray or gRPC calls: run them off the event loop, in daemon threads, so that
    # a call that hangs (its cluster gone) cannot hold up the process's exit.
    from router_service.server import _in_daemon_thread
    if joined is not None:
        return factory, None, lambda: _in_daemon_thread(joined.shutdown), None
    if pool is None:
        return factory, None, None, None
    from expert_workers.pool import PoolError
    try:
        pool.connect()  # here, in the main thread, before the server installs its signal handlers
    except PoolError as e:
        raise SystemExit(f"mesh: error: {e}") from None
    _watch_workers(pool)
    return (factory, lambda: _in_daemon_thread(pool.ready),
            lambda: _in_daemon_thread(lambda: pool.shutdown(3.0)), pool)


def _watch_workers(pool) -> None:
    """Worker health as a metric: 1 per rank that has loaded and joined, else 0 (read at scrape time)."""
    from opentelemetry.metrics import Observation

    from mesh import telemetry

    def observe(_):
        try:
            states = pool.statuses(timeout=2.0)
        except Exception:  # noqa: BLE001 - an unreachable pool reads as every worker down
            states = [{"rank": r, "state": "unreachable"} for r in range(pool.num_workers)]
        for st in states:
            yield Observation(1 if st["state"] == "joined" else 0, {"rank": st["rank"]})
    telemetry.meter().create_observable_gauge(telemetry.M_WORKER_UP, [observe],
                                              description="expert worker loaded and joined (1) or not (0)")


def served_model_name(args) -> str:
    """--served-model-name, else the Hub id given as --model, else the model directory's name."""
    if args.served_model_name:
        return args.served_model_name
    from router_service.hub import looks_like_hub_id
    given = args.model or os.environ.get("MESH_MODEL")
    if given and looks_like_hub_id(given):
        return given
    return args.resolved_model.name


def security(args):
    """(TokenTable or None, TlsFiles or None) from the security flags; SystemExit naming a bad one."""
    from router_service.auth import TokenTable, TokenFileError
    from router_service.tls import TlsError, TlsFiles
    tokens = None
    if args.auth_tokens_file:
        try:
            tokens = TokenTable.load(args.auth_tokens_file)
        except TokenFileError as e:
            raise SystemExit(f"mesh: error: --auth-tokens-file: {e}") from None
    try:
        tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    except TlsError as e:
        raise SystemExit(f"mesh: error: {e}") from None
    return tokens, tls


def cmd_serve(args) -> int:
    from router_service import logs
    logs.setup(args.log_level, args.log_format)
    if args.max_queued_requests < 1:
        raise SystemExit(f"mesh: error: --max-queued-requests must be at least 1, got {args.max_queued_requests}")
    if args.grace_period < 0:
        raise SystemExit(f"mesh: error: --grace-period must be >= 0, got {args.grace_period}")
    if not 0 <= args.port < 65536:
        raise SystemExit(f"mesh: error: --port must be in [0, 65535], got {args.port}")
    if args.http_port is not None and not 0 <= args.http_port < 65536:
        raise SystemExit(f"mesh: error: --http-port must be in [0, 65535], got {args.http_port}")
    if args.http_port is not None and args.http_port == args.port != 0:
        raise SystemExit(f"mesh: error: --http-port {args.http_port} is also --port: give them different ports")
    from mesh import telemetry
    from router_service.server import run_server
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise SystemExit(f"mesh: error: --metrics-port must be in [1, 65535], got {args.metrics_port}")
    try:
        telemetry.setup("mesh-gateway", metrics_port=args.metrics_port)
    except OSError as e:
        raise SystemExit(f"mesh: error: --metrics-port {args.metrics_port}: {e}") from None
    except RuntimeError as e:
        raise SystemExit(f"mesh: error: {e}") from None
    from router_service.admin import token_from_flag
    admin_token = token_from_flag(args.admin_token_file)
    factory, ready, on_shutdown, pool = build_engine_factory(args)
    tokens, tls = security(args)
    try:
        code = run_server(factory, args.host, args.port, max_queued=args.max_queued_requests,
                          grace=args.grace_period, num_workers=args.workers, ready=ready,
                          on_shutdown=on_shutdown, http_port=args.http_port, model_name=served_model_name(args),
                          admin_token=admin_token, expert_pool=pool, tokens=tokens, tls=tls)
    except RuntimeError as e:
        if "HTTP" in str(e):  # router_service.http_api names its address itself
            raise SystemExit(f"mesh: error: --http-port: {e}") from None
        # grpc: "Failed to bind to address ..."
        raise SystemExit(f"mesh: error: cannot listen on {args.host}:{args.port}: {e}") from None
    finally:
        telemetry.shutdown()  # flush the last spans and metrics
    pool = getattr(args, "pool", None)
    if pool is not None and (not pool.clean or not pool.shutdown_done or not pool.ray_alive()):
        # Ray's exit hooks would wait about a minute for a cluster that is gone: leave now (Ray's own
        # processes die with us: they share our fate).
        log.info("mesh serve: exiting without waiting for the stopped Ray cluster")
        logging.shutdown()
        os._exit(code)
    return code
