"""A small synchronous client for `mesh serve`, for programs that are not gRPC-minded.

    with MeshClient("127.0.0.1:50051") as c:
        for delta in c.generate(prompt="def add(a, b):", max_tokens=32, temperature=0):
            print(delta.new_text, end="")
        c.complete(prompt_token_ids=[1, 2, 3], max_tokens=8)  # {"token_ids", "text", ...}

Errors come back as `MeshError` with the gRPC status `code` and the server's `details`.
Several gateways ("host1:port1,host2:port2"): a call that gets UNAVAILABLE moves to the next one, and
a stream that already delivered tokens resumes there from them (see `MeshClient`).
Stopping the iteration of `generate` early (break, close, garbage collection) cancels the call, and
the server aborts the request and frees its KV cache.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.types import RequestOutput
from router_service import convert
from router_service.protos import admin_pb2 as apb
from router_service.protos import admin_pb2_grpc as apb_grpc
from router_service.protos import inference_pb2 as pb
from router_service.protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger("mesh.client")

# For clients in any language: round-robin over several gateways and retry UNAVAILABLE on the next,
# for calls that have not received a response message yet (gRPC never retries a stream after its
# first message; resuming one is `resume_token_ids`' job). Use with a target listing every gateway,
# e.g. "ipv4:10.0.0.1:50051,10.0.0.2:50051" or a DNS name resolving to all of them, and the channel
# option grpc.service_config = json.dumps(SERVICE_CONFIG).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "mesh.v1.Inference"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "n", "logprobs",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")


class MeshError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "MeshError":
        return cls(e.code(), e.details() or "")


def stats_dict(msg: pb.ServerStats) -> dict:
    """ServerStats -> a dict; the row-major expert load becomes [moe_layers][num_experts]."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        if f.name not in ("expert_load", "recent_steps"):
            v = getattr(msg, f.name)
            out[f.name] = v if isinstance(v, (int, float, str, bytes)) else list(v)  # repeated -> a list
    flat, e = list(msg.expert_load), msg.num_experts
    out["expert_load"] = [flat[i:i + e] for i in range(0, len(flat), e)] if e else []
    return out


def _logprobs(msgs) -> list[dict]:
    return [{"token_id": m.token_id, "logprob": m.logprob, "top": [[t.token_id, t.logprob] for t in m.top]}
            for m in msgs]


class MeshClient:
    def __init__(self, target: str, timeout: float | None = None, channel: grpc.Channel | None = None, *,
                 token: str | None = None, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None,
                 admin_token: str | None = None, failover_rounds: int = 2):
        """`timeout`: default deadline in seconds for every call (None: no deadline).
        `token`: sent as `authorization: Bearer <token>` on every call (servers with --auth-tokens-file).
        TLS: `tls=True` (or any of the tls_* arguments) connects over TLS; `tls_ca` is the PEM file that
        verifies the server (default: the system's roots); `tls_cert`/`tls_key` are this client's
        certificate for mutual TLS; `tls_server_name` overrides the name checked in the server's
        certificate (default: the target's host). `admin_token`: sent with the mesh.v1.Admin calls
        (get_pool, rebalance, scale_pool, set_autoscaling) in `x-admin-token`.

        Several gateways: `target` "host1:port1,host2:port2,...". A call that gets UNAVAILABLE (the
        gateway is gone, draining or still loading) goes to the next gateway in turn, up to
        `failover_rounds` times around the list; a stream that has already delivered tokens continues
        there from them (`resume_token_ids`), so the caller sees one unbroken stream (n = 1 only; a
        greedy or seeded stream continues exactly as it would have). Admin and health calls go to the
        gateway in use (`target`)."""
        self.targets = [t.strip() for t in target.split(",") if t.strip()] if channel is None else [target]
        if not self.targets:
            raise ValueError("target: give at least one host:port")
        self.timeout, self.failover_rounds = timeout, failover_rounds
        self.admin_token = admin_token
        self.failovers = 0  # calls moved to another gateway
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._tls = (tls or tls_ca or tls_cert or tls_key, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channels: dict[int, grpc.Channel] = {}
        if channel is not None:
            self._channels[0] = channel
        self._use(0)

    def _use(self, i: int) -> None:
        """Talk to gateway i of `targets` from now on (its channel made on first use)."""
        if i not in self._channels:
            secure, ca, cert, key, name = self._tls
            if secure:
                from router_service.tls import client_credentials
                opts = [("grpc.ssl_target_name_override", name)] if name else []
                self._channels[i] = grpc.secure_channel(self.targets[i], client_credentials(ca, cert, key), options=opts)
            else:
                self._channels[i] = grpc.insecure_channel(self.targets[i])
        self._index, self.target, self._channel = i, self.targets[i], self._channels[i]
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._admin = apb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _fail_over(self, e: grpc.RpcError, attempt: int) -> bool:
        """After `e` on attempt `attempt` (0 first): move to the next gateway and return True when the
        call should be tried there."""
        if e.code() != grpc.StatusCode.UNAVAILABLE or len(self.targets) < 2 or \
                attempt + 1 >= len(self.targets) * self.failover_rounds:
            return False
        log.warning("gateway %s: UNAVAILABLE (%s); trying %s", self.target, e.details(),
                    self.targets[(self._index + 1) % len(self.targets)])
        self._use((self._index + 1) % len(self.targets))
        self.failovers += 1
        return True

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> "MeshClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    @staticmethod
    def request(prompt: str | None = None, prompt_token_ids: list[int] | None = None, *,
                fim: tuple[str, str] | None = None, request_id: str = "", stop_token_ids=(),
                disable_prefix_cache: bool = False, **sampling) -> pb.GenerateRequest:
        """Build a GenerateRequest. `sampling`: max_tokens, temperature, top_p, top_k, seed, stop,
        ignore_eos, n, logprobs, presence_penalty, frequency_penalty, repetition_penalty, min_tokens;
        None or absent means the server's default."""
        unknown = set(sampling) - set(_SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        sp = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None and k != "stop"},
                               stop=list(sampling.get("stop") or ()))
        msg = pb.GenerateRequest(request_id=request_id, prompt=prompt or "",
                                 prompt_token_ids=list(prompt_token_ids or ()), sampling=sp,
                                 stop_token_ids=list(stop_token_ids), disable_prefix_cache=disable_prefix_cache)
        if fim is not None:
            msg.fim.prefix, msg.fim.suffix = fim
        return msg

    def generate(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None, *,
                 timeout: float | None = None, **kw) -> Iterator[RequestOutput]:
        """Stream deltas: each RequestOutput holds the new token ids and text (and `logprobs` when
        asked) of completion `index`; each completion's last has `finished` and `finish_reason`."""
        sent: list[int] = []  # completion 0's tokens delivered so far (what a failover resumes from)
        multi, delivered = (kw.get("n") or 1) > 1, False
        attempt = 0
        while True:
            msg_in = self.request(prompt, prompt_token_ids, **kw)
            msg_in.resume_token_ids.extend(sent)
            call = self._stub.Generate(msg_in, timeout=self._timeout(timeout), metadata=self._metadata)
            try:
                for msg in call:
                    out = convert.output_from_pb(msg)
                    if out.index == 0:
                        sent += out.new_token_ids
                    delivered = True
                    yield out
                return
            except grpc.RpcError as e:
                if (multi and delivered) or not self._fail_over(e, attempt):  # n > 1 cannot resume mid-stream
                    raise MeshError.from_rpc(e) from None
                attempt += 1
            finally:
                call.cancel()  # a no-op once the stream ended; frees the request if the caller stopped early

    def complete(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None, *,
                 timeout: float | None = None, **kw) -> dict:
        """The whole result: {"request_id", "token_ids", "text", "finish_reason", "usage"} of completion
        0, with "logprobs" ([{"token_id", "logprob", "top": [[id, logprob], ...]}]) when asked and, for
        n > 1, "completions": every completion as {"index", "token_ids", "text", "finish_reason", ...}."""
        attempt = 0
        while True:
            try:
                msg = self._stub.Complete(self.request(prompt, prompt_token_ids, **kw),
                                          timeout=self._timeout(timeout), metadata=self._metadata)
                break
            except grpc.RpcError as e:  # nothing was delivered: the whole call goes to the next gateway
                if not self._fail_over(e, attempt):
                    raise MeshError.from_rpc(e) from None
                attempt += 1
        out = {"request_id": msg.request_id, "token_ids": list(msg.token_ids), "text": msg.text,
               "finish_reason": convert.finish_reason_name(msg.finish_reason),
               "usage": convert.usage_from_pb(msg.usage).as_dict()}
        if kw.get("logprobs") is not None:
            out["logprobs"] = _logprobs(msg.logprobs)
        if len(msg.completions):
            out["completions"] = [{"index": c.index, "token_ids": list(c.token_ids), "text": c.text,
                                   "finish_reason": convert.finish_reason_name(c.finish_reason),
                                   **({"logprobs": _logprobs(c.logprobs)} if kw.get("logprobs") is not None else {})}
                                  for c in msg.completions]
        return out

    def tokenize(self, text: str, timeout: float | None = None) -> list[int]:
        try:
            return list(self._stub.Tokenize(pb.TokenizeRequest(text=text), timeout=self._timeout(timeout),
                                            metadata=self._metadata).token_ids)
        except grpc.RpcError as e:
            raise MeshError.from_rpc(e) from None

    def model_info(self, timeout: float | None = None) -> dict:
        try:
            msg = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout),
                                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise MeshError.from_rpc(e) from None
        return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}

    def server_stats(self, timeout: float | None = None) -> dict:
        """The server's load snapshot: running, waiting, kv_blocks_used/free, steps, in_flight, ...,
        and `expert_load` as a [moe_layers][num_experts] list of tokens routed."""
        try:
            msg = self._stub.GetServerStats(pb.GetServerStatsRequest(), timeout=self._timeout(timeout),
                                            metadata=self._metadata)
        except grpc.RpcError as e:
            raise MeshError.from_rpc(e) from None
        return stats_dict(msg)

    # ---- mesh.v1.Admin ------------------------------------------------------------------------
    def _admin_call(self, method: str, msg, timeout: float | None) -> dict:
        from google.protobuf.json_format import MessageToDict
        from router_service.auth import ADMIN_TOKEN_HEADER
        meta = list(self._metadata or ()) + ([(ADMIN_TOKEN_HEADER, self.admin_token)] if self.admin_token else [])
        try:
            out = getattr(self._admin, method)(msg, timeout=self._timeout(timeout), metadata=meta)
        except grpc.RpcError as e:
            raise MeshError.from_rpc(e) from None
        return MessageToDict(out, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def get_pool(self, timeout: float | None = None) -> dict:
        """The expert pool: workers, each layer's slots (row-major [workers][slots_per_rank]),
        replicas and load per expert over the load window, the imbalance, the autoscaling settings."""
        return self._admin_call("GetPool", apb.GetPoolRequest(), timeout)

    def rebalance(self, slots_per_rank: int = 0, timeout: float | None = None) -> dict:
        """Rebalance the pool (0 keeps the slot count); returns once it serves on the new placement."""
        return self._admin_call("Rebalance", apb.RebalanceRequest(slots_per_rank=slots_per_rank), timeout)

    def scale_pool(self, workers: int, timeout: float | None = None) -> dict:
        return self._admin_call("ScalePool", apb.ScalePoolRequest(workers=workers), timeout)

    def set_autoscaling(self, enabled: bool, imbalance_threshold: float = 0.0, look_back_period_s: float = 0.0,
                        interval_s: float = 0.0, min_workers: int = 0, max_workers: int = 0,
                        target_tokens_per_worker: float = 0.0, upscale_delay_s: float = 0.0,
                        downscale_delay_s: float = 0.0, max_queue_per_worker: float | None = None,
                        ttft_slo_s: float | None = None, tpot_slo_s: float | None = None,
                        timeout: float | None = None) -> dict:
        """Turn the policy loop (rebalancing, and sizing the pool when max_workers is set) on or off;
        0 keeps a setting as it is. The pressure signals (max_queue_per_worker, ttft_slo_s,
        tpot_slo_s): None keeps, 0 stops watching."""
        pressure = {k: v for k, v in (("max_queue_per_worker", max_queue_per_worker), ("ttft_slo_s", ttft_slo_s),
                                      ("tpot_slo_s", tpot_slo_s)) if v is not None}
        return self._admin_call("SetAutoscaling", apb.AutoscalingConfig(
            enabled=enabled, imbalance_threshold=imbalance_threshold, look_back_period_s=look_back_period_s,
            interval_s=interval_s, min_workers=min_workers, max_workers=max_workers,
            target_tokens_per_worker=target_tokens_per_worker, upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s, **pressure), timeout)

    def attach_gateway(self, host: str, port: int, placement_fingerprint: int,
                       timeout: float | None = None) -> dict:
        """Ask this gateway's expert pool to serve another gateway whose group store listens on
        host:port (what `mesh serve --join` does; the fingerprint is of the placement it read)."""
        return self._admin_call("AttachGateway", apb.AttachGatewayRequest(
            host=host, port=port, placement_fingerprint=placement_fingerprint), timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... for the whole server ("") or one service name."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self._timeout(timeout) or 5.0)
        except grpc.RpcError as e:
            raise MeshError.from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING; MeshError(DEADLINE_EXCEEDED) after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=1.0) == "SERVING":
                    return
            except MeshError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise MeshError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{self.target} did not report SERVING within {timeout:.0f}s")
            time.sleep(0.2)
