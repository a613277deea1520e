"""`mesh.v1.Admin` (protos/mesh/v1/admin.proto): the operator's view and control of the expert pool,
served on the gateway's gRPC server beside mesh.v1.Inference.

Every call first checks the admin token (`auth.check_admin`, the `x-admin-token` metadata against the
file of `--admin-token-file`): UNAUTHENTICATED without it; a server started with `--auth-tokens-file`
also wants a bearer token with the `admin` role (PERMISSION_DENIED for another role). Pool changes block on Ray and on a step
boundary, so they run in a thread; one change at a time (a second one gets ABORTED).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from router_service.auth import Unauthenticated, check_admin
from router_service.protos import admin_pb2 as apb
from router_service.protos import admin_pb2_grpc as apb_grpc

log = logging.getLogger("mesh.admin")
SERVICE = apb.DESCRIPTOR.services_by_name["Admin"].full_name


def read_token_file(path: str) -> str:
    """The admin token: the file's contents without surrounding whitespace (an empty file is refused)."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"--admin-token-file {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"--admin-token-file {path} is empty: put the admin token in it")
    return token


def token_from_flag(path: str | None) -> str | None:
    """--admin-token-file's token (None without the flag); an unusable file exits with a CLI error
    naming the flag (`mesh serve` and `mesh admin` both take it)."""
    if not path:
        return None
    try:
        return read_token_file(path)
    except ValueError as e:
        raise SystemExit(f"mesh: error: {e}") from None


def pool_message(pool, policy=None) -> apb.Pool:
    p = pool.placement
    load = pool.window_load()  # [L, E]
    try:
        statuses = pool.statuses(timeout=5.0)
    except Exception:  # noqa: BLE001 - an unreachable worker shows as such
        statuses = [{"rank": r, "state": "unreachable"} for r in range(pool.num_workers)]
    msg = apb.Pool(num_workers=p.num_ranks, slots_per_rank=p.slots_per_rank, num_experts=p.num_experts,
                   imbalance=pool.imbalance(load), load_window_s=pool.load_window_s,
                   changes=sum(1 for h in pool.history if h["changed"]),
                   recoveries=sum(1 for h in pool.history if h["kind"] == "recover"),
                   lost_workers=sum(len(h["lost_ranks"]) for h in pool.history if h["kind"] == "recover"),
                   target_workers=pool.target_workers, placement_fingerprint=p.fingerprint())
    for s in statuses:
        msg.workers.add(rank=s["rank"], state=s["state"], host=s.get("host", ""), pid=s.get("pid", 0),
                        steps=s.get("steps", 0), switches=s.get("switches", 0),
                        recoveries=s.get("recoveries", 0))
    for layer in range(p.num_layers):
        msg.layers.add(slots=p.phy2log[layer].tolist(), replicas=p.logcnt[layer].tolist(),
                       load=[int(x) for x in load[layer].tolist()])
    if policy is not None:
        msg.autoscaling.CopyFrom(apb.AutoscalingConfig(**policy.describe_proto()))
    return msg


def _change(rec: dict) -> apb.PoolChange:
    return apb.PoolChange(changed=rec["changed"], imbalance_before=rec["imbalance_before"],
                          imbalance_after=rec["imbalance_after"], loaded_bytes=rec["loaded_bytes"],
                          moved_experts=rec["moved_experts"], decision_to_serving_s=rec["decision_to_serving_s"],
                          slots_per_rank=rec["slots_per_rank"], workers=rec.get("workers_after", 0))


class AdminServicer(apb_grpc.AdminServicer):
    def __init__(self, gateway, token: str | None):
        self.gateway, self.token = gateway, token
        self._busy = asyncio.Lock()

    async def _authorize(self, context) -> None:
        # with --auth-tokens-file the bearer token must also carry the admin role
        from router_service.server import authorize
        await authorize(context, self.gateway, role="admin")
        try:
            check_admin(dict(context.invocation_metadata() or ()), self.token)
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    async def _act(self, pool, context, kind: str, reason: str, **kw) -> apb.PoolChange:
        """One pool change (`policy.act`), one at a time: a second one meanwhile gets ABORTED, a
        failure INTERNAL with its reason (logged as one line)."""
        if self._busy.locked():
            await context.abort(grpc.StatusCode.ABORTED, "another pool change is in progress; retry after it")
        async with self._busy:
            policy = self._policy(pool)
            try:
                rec = await asyncio.to_thread(policy.act, kind, reason, **kw)
            except Exception as e:  # noqa: BLE001 - the operator gets the reason
                log.error("admin: %s failed: %s: %s", kind, type(e).__name__, e)
                await context.abort(grpc.StatusCode.INTERNAL, f"{kind} failed: {type(e).__name__}: {e}")
        return _change(rec)

    async def _pool(self, context):
        await self._authorize(context)
        engine = self.gateway.engine
        pool = self.gateway.expert_pool
        if engine is None or not self.gateway.serving:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the gateway is not serving yet")
        if pool is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this gateway has no expert pool (--workers 0): nothing to place or scale")
        return pool

    def _policy(self, pool):
        return getattr(pool, "policy", None)

    async def GetPool(self, request, context):
        pool = await self._pool(context)
        return await asyncio.to_thread(pool_message, pool, self._policy(pool))

    async def Rebalance(self, request, context):
        pool = await self._pool(context)
        S = request.slots_per_rank
        E, W = pool.placement.num_experts, pool.num_workers
        if S and S * W < E:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"slots_per_rank={S} on {W} workers holds {S * W} slots, fewer than the model's "
                                f"{E} experts: give at least {-(-E // W)}")
        return await self._act(pool, context, "rebalance", "operator request", slots_per_rank=S or None)

    async def AttachGateway(self, request, context):
        pool = await self._pool(context)
        if not request.host or not 0 < request.port < 65536:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host and port (1-65535) of the joining gateway's "
                                                                  "group store are required")
        from expert_workers.pool import PlacementChanged, PoolError
        try:
            rec = await asyncio.to_thread(pool.attach_gateway, request.host, request.port,
                                          request.placement_fingerprint)
        except PlacementChanged as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (PoolError, Exception) as e:  # noqa: BLE001 - the joining gateway reports it
            log.error("admin: attaching a gateway at %s:%d failed: %s: %s", request.host, request.port,
                      type(e).__name__, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"attaching failed: {type(e).__name__}: {e}")
        return apb.AttachGatewayReply(num_workers=rec["num_workers"], gateways=rec["gateways"])

    async def ScalePool(self, request, context):
        pool = await self._pool(context)
        if request.workers < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"workers must be at least 1, got {request.workers}")
        return await self._act(pool, context, "scale", f"operator request: {request.workers} workers",
                               workers=request.workers)

    async def SetAutoscaling(self, request, context):
        pool = await self._pool(context)
        policy = self._policy(pool)
        from expert_workers.policy import PolicyConfig
        c = policy.config
        cfg = PolicyConfig(enabled=request.enabled,
                           imbalance_threshold=request.imbalance_threshold or c.imbalance_threshold,
                           look_back_period_s=request.look_back_period_s or c.look_back_period_s,
                           interval_s=request.interval_s or c.interval_s, min_rows=c.min_rows,
                           min_workers=request.min_workers or c.min_workers,
                           max_workers=request.max_workers or c.max_workers,
                           target_tokens_per_worker=request.target_tokens_per_worker or c.target_tokens_per_worker,
                           upscale_delay_s=request.upscale_delay_s or c.upscale_delay_s,
                           downscale_delay_s=request.downscale_delay_s or c.downscale_delay_s,
                           **{f: getattr(request, f) if request.HasField(f) else getattr(c, f)
                              for f in ("max_queue_per_worker", "ttft_slo_s", "tpot_slo_s")})
        try:
            await asyncio.to_thread(policy.configure, cfg)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("admin: autoscaling set to %s", policy.describe())
        return apb.AutoscalingConfig(**policy.describe_proto())
