"""The expert pool: Ray actors, one per expert rank, and the gateway's end of their process group.

Control plane only: Ray starts the actors (a placement group spreads them over nodes), they load their
own experts straight from the safetensors files, and report status. Per-layer tensors never travel
through Ray: they go over the torch.distributed group that the gateway (rank 0) and the workers
(ranks 1..W) join here.
"""

from __future__ import annotations

import collections
import logging
from datetime import timedelta
import os
import threading
import time

from expert_workers.worker import WorkerSpec, make_actor_class
from mesh.config import DTYPES, ModelConfig
from mesh.parallel.collective import free_port
from mesh.parallel.placement import Placement, rebalance

log = logging.getLogger("mesh.pool")


def _telemetry_env() -> dict[str, str]:
    """The gateway's OpenTelemetry and tracing settings, for the workers to export alike."""
    return {k: v for k, v in os.environ.items() if k.startswith(("OTEL_", "MESH_TRACE_"))
            and k != "OTEL_SERVICE_NAME"}


# How long a scale-up waits for Ray to place the added workers (an autoscaler may be adding nodes).
PLACEMENT_WAIT_S = 120.0
# A private local Ray cluster's logical CPUs beyond the machine's: room for workers added at runtime
# (logical CPUs only gate Ray's scheduling; each worker's threads are set by threads_per_worker).
LOCAL_HEADROOM_CPUS = 32
# How long re-forming a pool after a lost worker waits for the survivors to load and join (a survivor
# that fails meanwhile makes the supervisor try again with those left).
RECOVERY_JOIN_S = 120.0


class PoolError(RuntimeError):
    pass


class PlacementChanged(PoolError):
    """A joining gateway read a placement that is no longer the pool's: it reads again and retries."""


def _node_ip() -> str:
    import ray
    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


def _resolve_auto() -> str:
    """`--ray-address auto`: RAY_ADDRESS, else the cluster that `ray start` recorded on this machine.
    Never Ray's own fallback of joining any Ray instance it can see running here: that may be another
    `mesh serve`'s private cluster, whose CPUs this server would then wait for."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        log.info("--ray-address auto: joining the Ray cluster at %s (RAY_ADDRESS)", env)
        return env
    from ray._private.utils import read_ray_address
    found = read_ray_address()
    if not found:
        raise PoolError("--ray-address auto: no Ray cluster started with `ray start` was found on this machine "
                        "(nor RAY_ADDRESS); start one (`ray start --head`), give its address, or leave "
                        "--ray-address out for a private cluster. Private clusters of other servers are never "
                        "joined")
    log.info("--ray-address auto: joining the Ray cluster that `ray start` recorded at %s", found)
    return found


class ExpertPool:
    def __init__(self, model_dir: str, dtype: str, num_workers: int, ray_address: str | None = None,
                 threads_per_worker: int | None = None, worker_cpus: float | None = None,
                 placement: Placement | None = None, load_timeout: float = 300.0, device: str = "cpu",
                 backend: str = "auto", load_format: str = "auto", redundant: int = 0,
                 load_window_s: float = 60.0):
        """`device`: the gateway's. On "cuda[:N]" every worker asks Ray for one GPU of its own and the
        group runs over NCCL; on "cpu" over gloo. `backend`, `load_format`: the workers' expert
        kernels and weights (EngineConfig's). `redundant`: replica slots beyond one per expert
        (rounded up so every worker holds the same number of slots). `load_window_s`: how far back
        the per-expert load that `rebalance` balances reaches."""
        if num_workers < 1:
            raise ValueError(f"--workers must be at least 1, got {num_workers}")
        if redundant < 0:
            raise ValueError(f"--redundant-experts must be 0 or more, got {redundant}")
        self.model_dir, self.dtype, self.num_workers = str(model_dir), dtype, num_workers
        self.device = device
        self.gpu = device.startswith("cuda")
        self.backend = "nccl" if self.gpu else "gloo"
        self.model_backend, self.load_format = backend, load_format
        self.cfg = ModelConfig.from_dir(model_dir)
        if placement is None:
            placement = Placement.initial(self.cfg.num_moe_layers, self.cfg.num_experts, num_workers, redundant)
        self.placement = placement
        self.load_window_s = load_window_s
        self._load_marks: collections.deque = collections.deque()  # (monotonic time, cumulative [L, E] load)
        self._change_lock = threading.Lock()  # one placement change at a time
        # how a switch reaches an idle engine: set by the server to run `dispatcher.apply_pending` on the
        # engine thread between steps (a running engine applies it at its next step anyway)
        self.wake = None
        self.history: list[dict] = []  # one record per placement change
        self.policy = None  # expert_workers.policy.RebalancePolicy once started
        self._extra_pgs: list = []  # placement groups of workers added at runtime
        self.ray_address = ray_address
        cpus = os.cpu_count() or 1
        self.threads_per_worker = threads_per_worker or max(1, cpus // (num_workers + 1))
        self.worker_cpus = worker_cpus
        self.load_timeout = load_timeout
        self.actors: list = []
        self.serve_refs: list = []
        self.dispatcher = None
        self._started_ray = False
        self._pg = None
        self.clean = True  # False after a shutdown that could not stop the cluster itself
        self._token_dir: str | None = None
        self._saved_auth_mode: str | None = None
        self.shutdown_done = False
        # the supervisor: re-forms the pool when a worker is lost, then brings it back to `target_workers`
        self.target_workers = num_workers
        self.replace_lost = True
        self._trouble = threading.Event()  # set by the dispatcher when one of its collectives failed
        self._stopping = threading.Event()
        self._no_recovery = False  # the server is stopping: a lost worker ends the pool instead
        self.attached = 0  # other gateways attached so far (attach_gateway)
        self._supervisor: threading.Thread | None = None

    # ---- start -----------------------------------------------------------------------------
    def connect(self) -> None:
        """Join --ray-address, or start a private local Ray cluster that `shutdown` stops.

        Call it from the main thread before installing signal handlers: Ray's core installs its own
        for SIGTERM, and a server wants the last word on what SIGTERM does."""
        import ray
        if ray.is_initialized():
            return
        if self.ray_address:
            address = _resolve_auto() if self.ray_address == "auto" else self.ray_address
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            except ConnectionError as e:
                raise PoolError(f"--ray-address {self.ray_address}: cannot join the Ray cluster at {address}: "
                                f"{e}") from None
        else:
            self._private_token()
            try:
                self._start_private(ray)
            except BaseException:
                self._remove_token()  # nothing started: no token left behind
                raise
            self._started_ray = True

    def _start_private(self, ray) -> None:
        # address="local": always a new cluster of its own (a bare ray.init() would join one that
        # `ray start` recorded on this machine, or that RAY_ADDRESS names)
        # every worker gets a CPU slot, with headroom for workers added at runtime (ExpertPool.scale)
        kw = dict(address="local", include_dashboard=False,
                  num_cpus=max(os.cpu_count() or 1, self.num_workers) + LOCAL_HEADROOM_CPUS, log_to_driver=True)
        if not self.gpu:
            ray.init(**kw)
        else:
            # The gateway keeps its own GPU: the private cluster sees only the others, so Ray
            # never hands a worker the gateway's device (the raylet inherits this environment).
            others = self._worker_gpus()
            if len(others) < self.num_workers:
                raise PoolError(f"--workers {self.num_workers} on GPUs needs {self.num_workers} GPUs "
                                f"besides the gateway's {self.device}; this machine has {len(others)} more")
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(others)
            try:
                ray.init(num_gpus=len(others), **kw)
            finally:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def _private_token(self) -> None:
        """Ray's token authentication for the private cluster, with a fresh token of its own in a
        directory only this user can read (removed at shutdown), rather than the ~/.ray/auth_token
        that Ray would create (world-readable, and shared by every cluster this user starts). An
        explicit RAY_AUTH_MODE, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is left as it is."""
        import secrets
        import tempfile
        if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or \
                os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
            return
        self._token_dir = tempfile.mkdtemp(prefix="mesh-ray-")  # mode 0700
        path = os.path.join(self._token_dir, "auth_token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self._saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = path  # the raylet and the workers inherit it
        self._reload_ray_auth()  # this process read Ray's settings when ray was imported
        log.info("expert pool: private Ray cluster with token authentication (token in %s)", path)

    def _worker_gpus(self) -> list[str]:
        """This machine's GPUs (as CUDA_VISIBLE_DEVICES names them) other than the gateway's."""
        import torch
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = ([x.strip() for x in visible.split(",") if x.strip()] if visible is not None
                 else [str(i) for i in range(torch.cuda.device_count())])
        mine = torch.device(self.device).index or 0
        return [n for i, n in enumerate(names) if i != mine]

    def start(self):
        """Start Ray (or join it), the actors, and the group; returns the gateway's CollectiveDispatcher."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from mesh.parallel.collective import CollectiveDispatcher, init_mesh_group, new_group

        t0 = time.perf_counter()
        self.connect()
        cpus = self.worker_cpus if self.worker_cpus is not None else 1
        bundle = {"CPU": cpus, "GPU": 1} if self.gpu else {"CPU": cpus}
        self._bundle, self._cpus = bundle, cpus
        self._pg = placement_group([bundle] * self.num_workers, strategy="SPREAD")
        self._wait_resources(bundle)
        host = _node_ip() if self.ray_address else "127.0.0.1"
        port = free_port(host)
        # NCCL: torch.distributed's default group. gloo: a group of the pool's own (its own TCP store,
        # served by the gateway), like every later one: no process-wide state, and a group given up
        # after a lost worker is simply dropped (a process may start several pools)
        init_method = f"tcp://{host}:{port}" if self.gpu else ""
        group_host, group_port = ("", 0) if self.gpu else (host, port)
        actor_cls = make_actor_class()
        phy2log = self.placement.phy2log.tolist()
        for w in range(self.num_workers):
            spec = WorkerSpec(self.model_dir, self.dtype, w, 1, phy2log, self.placement.num_ranks,
                              self.placement.slots_per_rank, init_method, self.threads_per_worker,
                              device="cuda" if self.gpu else "cpu",  # Ray shows each worker its own GPU
                              backend=self.model_backend, load_format=self.load_format,
                              group_host=group_host, group_port=group_port)
            actor = actor_cls.options(
                num_cpus=cpus, num_gpus=1 if self.gpu else 0, name=None,
                runtime_env={"env_vars": _telemetry_env()},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=w),
            ).remote(spec)
            self.actors.append(actor)
            self.serve_refs.append(actor.serve.remote())
        self._wait_loaded()
        # Every worker joins right after loading; rank 0 completes the rendezvous.
        group = None
        if self.gpu:
            import torch
            torch.cuda.set_device(torch.device(self.device).index or 0)
            init_mesh_group(init_method, 1 + self.num_workers, 0, backend=self.backend)
        else:
            group = new_group(host, port, 1 + self.num_workers, 0, timeout=timedelta(seconds=self.load_timeout))
        self.dispatcher = CollectiveDispatcher(self.placement, 1, self.cfg.hidden_size, DTYPES[self.dtype],
                                               group=group, device=self.device, worker_threads=self.threads_per_worker)
        from expert_workers.policy import RebalancePolicy
        self.policy = RebalancePolicy(self)  # off until configured (Admin SetAutoscaling)
        self.sample_load()
        if not self.gpu:  # re-forming needs gloo (an NCCL communicator cannot be abandoned mid-collective)
            self.dispatcher.on_lost = lambda reason: self._trouble.set()
            self._supervisor = threading.Thread(target=self._supervise, name="mesh-pool-supervisor", daemon=True)
            self._supervisor.start()
        log.info("expert pool: %d workers joined in %.1fs (%s %s:%d)", self.num_workers, time.perf_counter() - t0,
                 self.backend, host, port)
        return self.dispatcher

    def _wait_resources(self, bundle: dict, every: float = 10.0) -> None:
        """Wait for the placement group, saying every `every` seconds what the cluster lacks."""
        import ray
        ready = self._pg.ready()
        t0 = time.monotonic()
        while not ray.wait([ready], timeout=min(every, max(0.1, t0 + self.load_timeout - time.monotonic())))[0]:
            waited = time.monotonic() - t0
            need = {k: v * self.num_workers for k, v in bundle.items()}
            try:
                free, total = ray.available_resources(), ray.cluster_resources()
                have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in need)
            except Exception as e:  # noqa: BLE001 - the message is what matters
                have = f"cluster resources unknown ({e})"
            what = (f"expert pool: waiting {waited:.0f}s for Ray resources: {self.num_workers} workers need "
                    f"{', '.join(f'{k} {v:g}' for k, v in need.items())} (one bundle of {bundle} each, spread); "
                    f"the cluster has {have}")
            if waited >= self.load_timeout:
                raise PoolError(what.replace("waiting", "gave up after", 1))
            log.warning("%s", what)

    def _wait_loaded(self) -> None:
        import ray
        deadline = time.monotonic() + self.load_timeout
        t0 = last_note = time.monotonic()
        while True:
            done, _ = ray.wait(self.serve_refs, timeout=0)
            for ref in done:  # serve() returned before the group formed: it failed
                ray.get(ref)
            try:
                states = self.statuses(timeout=5.0)
            except ray.exceptions.GetTimeoutError:  # actors still starting (a busy machine): keep waiting
                states = [{"rank": r, "state": "starting"} for r in range(self.num_workers)]
            failed = [s for s in states if s["state"] == "failed"]
            if failed:
                raise PoolError(f"expert worker {failed[0]['rank']} failed to load:\n{failed[0]['error']}")
            if all(s["state"] in ("loaded", "joined") for s in states):
                return
            if time.monotonic() > deadline:
                raise PoolError(f"expert workers not loaded after {self.load_timeout:.0f}s: "
                                f"{[s['state'] for s in states]}")
            if time.monotonic() - last_note >= 10.0:
                last_note = time.monotonic()
                log.info("expert pool: waiting %.0fs for workers to load: %s", last_note - t0,
                         ", ".join(f"rank {s['rank']} {s['state']}" for s in states))
            time.sleep(0.1)

    # ---- live rebalancing -------------------------------------------------------------------
    def sample_load(self) -> None:
        """Note the dispatcher's cumulative per-expert load now (the sliding window's points)."""
        if self.dispatcher is None:
            return
        now = time.monotonic()
        self._load_marks.append((now, self.dispatcher.expert_load.clone()))
        while len(self._load_marks) > 2 and self._load_marks[1][0] < now - self.load_window_s:
            self._load_marks.popleft()

    def window_load(self) -> "torch.Tensor":
        """Rows routed to each expert [L, E] over the last `load_window_s` seconds (as far as the
        samples reach; since start before there are two samples)."""
        self.sample_load()
        newest = self._load_marks[-1][1]
        oldest = self._load_marks[0][1] if len(self._load_marks) > 1 else 0 * newest
        return newest - oldest

    def window_tokens_per_s(self, load=None) -> float:
        """Routed tokens per second over the window: rows per layer / top-k / the window's seconds."""
        load = self.window_load() if load is None else load
        span = self._load_marks[-1][0] - self._load_marks[0][0] if len(self._load_marks) > 1 else 0.0
        if span <= 0:
            return 0.0
        return float(load.sum()) / max(1, self.cfg.num_moe_layers) / max(1, self.cfg.top_k) / span

    def imbalance(self, load=None) -> float:
        """max / mean rows per worker of the current placement over `load` (default the window),
        the worst MoE layer; 1.0 is perfect balance."""
        rank_load = self.placement.rank_load(self.window_load() if load is None else load)  # [L, W]
        mean = rank_load.mean(dim=1).clamp_min(1e-9)
        return float((rank_load.max(dim=1).values / mean).max())

    def rebalance(self, load=None, slots_per_rank: int | None = None, timeout: float | None = None) -> dict:
        """Move to the placement `placement.rebalance` computes from `load` [L, E] (default: the
        sliding window) with `slots_per_rank` slots per worker (default: as now; more or fewer adds
        or removes replicas). The workers load their new slots from the checkpoint while serving, the
        engine switches at one step boundary, and the old slots are freed. Returns what happened."""
        import ray
        import torch

        if self.dispatcher is None:
            raise PoolError("the expert pool is not running")
        timeout = self.load_timeout if timeout is None else timeout
        with self._change_lock:
            t0 = time.perf_counter()
            load = self.window_load() if load is None else torch.as_tensor(load, dtype=torch.float64)
            S = slots_per_rank or self.placement.slots_per_rank
            old = self.placement
            new = rebalance(load, self.num_workers, S)
            record = {"kind": "rebalance", "slots_per_rank": S, "imbalance_before": self.imbalance(load),
                      "imbalance_after": self._imbalance_of(new, load), "changed": False, "loaded_bytes": 0,
                      "moved_experts": 0, "decision_to_serving_s": 0.0}
            if new.fingerprint() == old.fingerprint():
                self.history.append(record)
                return record
            refs = [a.prepare.remote(new.phy2log.tolist(), new.num_ranks, S) for a in self.actors]
            staged = ray.get(refs, timeout=timeout)
            if any(r["fingerprint"] != new.fingerprint() for r in staged):
                raise PoolError(f"expert workers staged different placements: {[r['fingerprint'] for r in staged]}")
            t_loaded = time.perf_counter()
            done = self.dispatcher.request_switch(new)
            if self.wake is not None:
                self.wake()
            self._wait_switch(done, timeout)
            self.placement = new
            record.update(changed=True, loaded_bytes=sum(r["loaded_bytes"] for r in staged),
                          moved_experts=sum(r["new_experts"] for r in staged),
                          load_seconds=t_loaded - t0, decision_to_serving_s=time.perf_counter() - t0)
            self.history.append(record)
            log.info("expert pool: rebalanced to %d slots per worker in %.2fs (%d experts moved, %.1f MB "
                     "loaded; imbalance %.2f -> %.2f)", S, record["decision_to_serving_s"],
                     record["moved_experts"], record["loaded_bytes"] / 1e6, record["imbalance_before"],
                     record["imbalance_after"])
            return record

    def scale(self, num_workers: int, load=None, timeout: float | None = None) -> dict:
        """Grow or shrink the pool to `num_workers` while it serves.

        The new placement (`rebalance` of the window's load over the new worker count, every slot of
        the removed workers moved to the others) is staged on every worker that stays; added workers
        are new Ray actors in a placement group of their own (which is what makes the Ray and KubeRay
        autoscalers add nodes); the gateway, the staying and the added workers form a new gloo group
        beside the serving one; at one step boundary the SWITCH moves every step after it onto the
        new group, and removed workers leave their loop and are stopped."""
        import ray
        import torch
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from mesh.parallel.collective import group_handshake, new_group

        if self.dispatcher is None:
            raise PoolError("the expert pool is not running")
        if self.gpu:
            raise PoolError("changing the worker count at runtime is implemented for gloo (CPU) pools only")
        if num_workers < 1:
            raise ValueError(f"workers must be at least 1, got {num_workers}")
        timeout = self.load_timeout if timeout is None else timeout
        self.target_workers = num_workers
        with self._change_lock:
            t0 = time.perf_counter()
            W, old = self.num_workers, self.placement
            load = self.window_load() if load is None else torch.as_tensor(load, dtype=torch.float64)
            record = {"kind": "scale", "workers_before": W, "workers_after": num_workers, "changed": False,
                      "loaded_bytes": 0, "moved_experts": 0, "decision_to_serving_s": 0.0,
                      "slots_per_rank": old.slots_per_rank, "imbalance_before": self.imbalance(load)}
            if num_workers == W:
                record["imbalance_after"] = record["imbalance_before"]
                self.history.append(record)
                return record
            S = -(-old.num_slots // num_workers)  # the same slots, spread over the new workers
            new = rebalance(load, num_workers, S)
            host = _node_ip() if self.ray_address else "127.0.0.1"
            port = free_port(host)
            keep = min(W, num_workers)
            added, added_refs = [], []
            if num_workers > W:
                # Ask Ray for the added workers' resources first (on a Ray or KubeRay autoscaling cluster
                # this placement group is what adds nodes); nothing else has started if it cannot be met.
                pg = placement_group([self._bundle] * (num_workers - W), strategy="SPREAD")
                wait = min(timeout, PLACEMENT_WAIT_S)
                try:
                    ray.get(pg.ready(), timeout=wait)
                except ray.exceptions.GetTimeoutError:
                    ray.util.remove_placement_group(pg)
                    raise PoolError(f"Ray could not place {num_workers - W} more expert worker(s) "
                                    f"({self._bundle} each) within {wait:.0f}s: the cluster lacks the resources "
                                    f"and no autoscaler added them") from None
                self._extra_pgs.append(pg)
                actor_cls = make_actor_class()
                for i, r in enumerate(range(W, num_workers)):
                    spec = WorkerSpec(self.model_dir, self.dtype, r, 1, new.phy2log.tolist(), num_workers, S, "",
                                      self.threads_per_worker, device="cpu", backend=self.model_backend,
                                      load_format=self.load_format, group_host=host, group_port=port)
                    actor = actor_cls.options(
                        num_cpus=self._cpus, runtime_env={"env_vars": _telemetry_env()},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                    ).remote(spec)
                    added.append(actor)
                    added_refs.append(actor.serve.remote())
            refs = [self.actors[r].prepare.remote(new.phy2log.tolist(), num_workers, S, host, port)
                    for r in range(keep)]
            refs += [self.actors[r].leave.remote(new.phy2log.tolist(), num_workers, S) for r in range(keep, W)]
            # the gateway's end of the new group: returns once every member joined it
            group = new_group(host, port, 1 + num_workers, 0, timeout=timedelta(seconds=timeout))
            group_handshake(group, self.dispatcher.layout(new))
            staged = ray.get(refs, timeout=timeout)
            if any(r["fingerprint"] != new.fingerprint() for r in staged):
                raise PoolError(f"expert workers staged different placements: {[r['fingerprint'] for r in staged]}")
            t_loaded = time.perf_counter()
            done = self.dispatcher.request_switch(new, group=group)
            if self.wake is not None:
                self.wake()
            self._wait_switch(done, timeout)
            leaving, leaving_refs = self.actors[keep:], self.serve_refs[keep:]
            self.actors = self.actors[:keep] + added
            self.serve_refs = self.serve_refs[:keep] + added_refs
            self.num_workers, self.placement = num_workers, new
            try:
                ray.get(leaving_refs, timeout=timeout)  # their loops ended at the SWITCH
            except Exception as e:  # noqa: BLE001 - they are stopped below either way
                log.warning("expert pool: a removed worker did not stop cleanly: %s", e)
            for a in leaving:
                ray.kill(a)
            record.update(changed=True, slots_per_rank=S, imbalance_after=self._imbalance_of(new, load),
                          loaded_bytes=sum(r["loaded_bytes"] for r in staged),
                          moved_experts=sum(r["new_experts"] for r in staged), load_seconds=t_loaded - t0,
                          decision_to_serving_s=time.perf_counter() - t0)
            self.history.append(record)
            log.info("expert pool: %d -> %d workers in %.2fs (%d slots per worker)", W, num_workers,
                     record["decision_to_serving_s"], S)
            return record

    # ---- more gateways ------------------------------------------------------------------------
    def attach_gateway(self, host: str, port: int, fingerprint: int, timeout: float = 120.0) -> dict:
        """Another gateway serves from this pool: every worker joins a group of its own with it (the
        gateway's TCP store on host:port, gateway rank 0) and serves it from another thread, from the
        experts it holds for the current placement, which must be the one the gateway read
        (`fingerprint`). Independent of this gateway's group: no lockstep between gateways; a later
        placement change here leaves the attached groups on the experts they were formed with, and a
        worker that leaves or dies breaks them (the joined gateway then attaches again)."""
        import ray
        if self.dispatcher is None:
            raise PoolError("the expert pool is not running")
        with self._change_lock:
            if self.placement.fingerprint() != fingerprint:
                raise PlacementChanged(f"the pool's placement changed (now {self.placement.fingerprint():#x}, "
                                       f"read {fingerprint:#x}): read it again")
            refs = [a.attach.remote(host, port, self.placement.phy2log.tolist(), self.num_workers,
                                    self.placement.slots_per_rank) for a in self.actors]
            ray.get(refs, timeout=timeout)
            self.attached += 1
            log.info("expert pool: a gateway at %s:%d attached (%d attachments so far)", host, port, self.attached)
            return {"num_workers": self.num_workers, "gateways": 1 + self.attached}

    # ---- a lost worker ------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Watch every worker's serve loop (its Ray object ref resolves when the actor dies or the loop
        ends) and the dispatcher's failure signal; on either, re-form the pool (`recover`)."""
        import ray
        while not self._stopping.is_set():
            refs = list(self.serve_refs)
            try:
                done = ray.wait(refs, num_returns=1, timeout=0.5)[0] if refs else []
            except Exception:  # noqa: BLE001 - Ray going away at shutdown
                done = []
                self._stopping.wait(0.5)
            if self._stopping.is_set():
                return
            if not done and not self._trouble.is_set():
                if not refs:
                    self._stopping.wait(0.5)
                continue
            try:
                self.recover()
            except Exception:  # noqa: BLE001 - keep supervising; the engine waits or gives up on its own
                log.exception("expert pool: re-forming the pool failed")
                self._stopping.wait(1.0)

    def recover(self, timeout: float | None = None) -> dict | None:
        """Re-form the pool without its lost workers (actor dead or serve loop ended; with none of
        those but a failed collective, with every worker): the gateway's dispatcher gives up the broken
        group, the survivors keep their slots and take the lost ones' experts into added slots
        (`Placement.heal`: nothing to load where replicas survive), everyone joins a new group, and the
        engine's next step runs on it; the interrupted step's requests run again from their tokens.
        Then, outside the pool's lock, the pool grows back to `target_workers` (`scale`). Returns the
        record of what happened, or None when nothing was lost."""
        import ray

        from mesh.parallel.collective import group_handshake

        timeout = min(self.load_timeout, RECOVERY_JOIN_S) if timeout is None else timeout
        with self._change_lock:
            if self.dispatcher is None or self._stopping.is_set():
                return None
            t0 = time.perf_counter()
            W = self.num_workers
            done = set(ray.wait(self.serve_refs, num_returns=W, timeout=0)[0])
            lost = {r: self._why_lost(r) for r, ref in enumerate(self.serve_refs) if ref in done}
            if not lost and not self._trouble.is_set():
                return None
            if not lost:  # a collective failed first: give Ray a moment to report the death
                lost = self._reported_lost()
            why = "; ".join(f"worker {r}: {w}" for r, w in lost.items()) or "a collective failed, every worker alive"
            # given up before the signal is cleared: a collective of the old group failing from now on is
            # this loss, not a new one (the dispatcher signals only losses it had not been told of)
            self.dispatcher.mark_lost(why)
            self._trouble.clear()
            if self._no_recovery:
                self.dispatcher.give_up("the server is stopping and its expert pool lost a worker")
                return None
            for r in lost:
                try:
                    ray.kill(self.actors[r])
                except Exception:  # noqa: BLE001 - already gone
                    pass
            # the others are asked: one that died at about the same time, or hangs, is not part of the next group
            lost.update(self._unresponsive([r for r in range(W) if r not in lost]))
            why = "; ".join(f"worker {r}: {w}" for r, w in lost.items()) or why
            keep = [r for r in range(W) if r not in lost]
            log.warning("expert pool: lost %s; re-forming the pool from %d of %d workers", why, len(keep), W)
            record = {"kind": "recover", "lost_ranks": sorted(lost), "reason": why, "workers_before": W,
                      "workers_after": len(keep), "changed": bool(keep), "loaded_bytes": 0, "moved_experts": 0,
                      "slots_per_rank": self.placement.slots_per_rank, "decision_to_serving_s": 0.0}
            if not keep:
                self.dispatcher.give_up(f"every expert worker of this gateway is lost ({why}); it cannot serve "
                                        f"without its experts until it is restarted")
                self.actors, self.serve_refs, self.num_workers = [], [], 0
                self.history.append(record)
                log.error("expert pool: no expert worker is left (%s)", why)
                return record
            load = self.window_load()
            new = self.placement.heal(set(lost), load)
            host = _node_ip() if self.ray_address else "127.0.0.1"
            port = free_port(host)
            refs = [self.actors[r].recover.remote(new.phy2log.tolist(), len(keep), new.slots_per_rank, host, port, i)
                    for i, r in enumerate(keep)]
            try:
                group = self._join(host, port, 1 + len(keep), refs, timeout)
                group_handshake(group, self.dispatcher.layout(new))
                staged = ray.get(refs, timeout=timeout)
                if any(r["fingerprint"] != new.fingerprint() for r in staged):
                    raise PoolError(f"expert workers staged different placements: "
                                    f"{[r['fingerprint'] for r in staged]}")
            except BaseException:
                self._trouble.set()  # another survivor failed on the way: the supervisor tries again
                raise
            self.dispatcher.install_recovery(new, group)
            self.actors = [self.actors[r] for r in keep]
            self.serve_refs = [self.serve_refs[r] for r in keep]
            self.num_workers, self.placement = len(keep), new
            record.update(slots_per_rank=new.slots_per_rank, imbalance_after=self._imbalance_of(new, load),
                          loaded_bytes=sum(r["loaded_bytes"] for r in staged),
                          moved_experts=sum(r["new_experts"] for r in staged),
                          decision_to_serving_s=time.perf_counter() - t0)
            self.history.append(record)
            log.warning("expert pool: re-formed with %d workers in %.2fs (%d slots per worker; %d experts moved, "
                        "%.1f MB loaded)", len(keep), record["decision_to_serving_s"], new.slots_per_rank,
                        record["moved_experts"], record["loaded_bytes"] / 1e6)
        if self.replace_lost and self.num_workers < self.target_workers and not self._stopping.is_set():
            log.info("expert pool: adding %d worker(s) to return to %d", self.target_workers - self.num_workers,
                     self.target_workers)
            try:
                record["restored"] = self.scale(self.target_workers)
            except Exception as e:  # noqa: BLE001 - serving on the smaller pool goes on
                log.error("expert pool: could not return to %d workers: %s", self.target_workers, e)
        return record

    def begin_stop(self) -> None:
        """The server is stopping (any thread; no Ray call): a worker lost from now on is not replaced,
        and a re-forming the engine is waiting for ends at once (its step fails, as the drain expects:
        a signal to the whole process group stops the workers too)."""
        self._no_recovery = True
        if self.dispatcher is not None and self.dispatcher.lost:
            self.dispatcher.give_up("the server is stopping and its expert pool lost a worker")

    def _unresponsive(self, ranks: list[int], timeout: float = 5.0) -> dict[int, str]:
        """Of `ranks`, the workers that do not answer a status call (a dead actor fails it at once)."""
        import ray
        refs = {self.actors[r].status.remote(): r for r in ranks}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        out = {}
        for ref, r in refs.items():
            try:
                if ref not in ready:
                    raise TimeoutError(f"no answer within {timeout:.0f}s")
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - dead or hung: either way out
                out[r] = f"it does not answer ({type(e).__name__})"
                try:
                    ray.kill(self.actors[r])
                except Exception:  # noqa: BLE001 - already gone
                    pass
        return out

    @staticmethod
    def _join(host: str, port: int, size: int, refs: list, timeout: float):
        """The gateway's end of a new group whose other members join through `refs` (their actor
        calls): returns the group once all joined; raises as soon as one of those calls fails (a member
        that dies meanwhile), instead of waiting out the rendezvous."""
        import ray

        from mesh.parallel.collective import new_group
        box: dict = {}

        def join():
            try:
                box["group"] = new_group(host, port, size, 0, timeout=timedelta(seconds=timeout))
            except BaseException as e:  # noqa: BLE001 - reported below, or dropped if given up
                box["error"] = e

        t = threading.Thread(target=join, name="mesh-pool-join", daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while t.is_alive():
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2)
            for ref in done:
                ray.get(ref)  # a member's call failed: raise its error (the join thread times out alone)
            if time.monotonic() > deadline:
                raise PoolError(f"the new expert group did not form within {timeout:.0f}s")
        if "error" in box:
            raise box["error"]
        return box["group"]

    def _reported_lost(self, grace_s: float = 5.0) -> dict[int, str]:
        """The workers whose serve loop Ray reports ended within `grace_s` (a collective may fail a
        little before Ray learns that a process died)."""
        import ray
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            done = set(ray.wait(self.serve_refs, num_returns=len(self.serve_refs), timeout=0.5)[0])
            if done:
                return {r: self._why_lost(r) for r, ref in enumerate(self.serve_refs) if ref in done}
        return {}

    def _why_lost(self, r: int) -> str:
        """Why worker r's serve loop ended, in a few words."""
        import ray
        try:
            ray.get(self.serve_refs[r], timeout=0)
            return "its serve loop ended"
        except ray.exceptions.RayActorError:
            return "its process died"
        except Exception as e:  # noqa: BLE001 - the loop raised
            return f"its serve loop failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    def _wait_switch(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done.wait(1.0):
            if self.dispatcher.lost:
                raise PoolError("an expert worker was lost during the change: the pool re-forms without it, "
                                "on its current placement")
            failed = [s for s in self.statuses(timeout=10.0) if s["state"] == "failed"]
            if failed:  # a worker that died on the switch: the group is broken, say why
                raise PoolError(f"expert worker {failed[0]['rank']} failed at the placement switch:\n"
                                f"{failed[0]['error']}")
            if time.monotonic() > deadline:
                raise PoolError(f"the engine did not reach a step boundary within {timeout:.0f}s to switch")

    @staticmethod
    def _imbalance_of(placement: Placement, load) -> float:
        rank_load = placement.rank_load(load)
        return float((rank_load.max(dim=1).values / rank_load.mean(dim=1).clamp_min(1e-9)).max())

    # ---- watch -----------------------------------------------------------------------------
    def statuses(self, timeout: float = 10.0) -> list[dict]:
        import ray
        return ray.get([a.status.remote() for a in self.actors], timeout=timeout)

    def ready(self) -> bool:
        """True when every worker has loaded its shard and joined the group."""
        try:
            return self.dispatcher is not None and all(s["state"] == "joined" for s in self.statuses())
        except Exception:
            return False

    # ---- stop ------------------------------------------------------------------------------
    def ray_alive(self) -> bool:
        """False when the private cluster this pool started has lost a process (GCS, raylet)."""
        try:
            from ray._private import worker
            node = worker._global_node
            return node is None or bool(node.remaining_processes_alive())
        except Exception:  # noqa: BLE001 - an internal API: assume alive, as before
            return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Release the workers from their loop, then stop them and (if we started it) Ray.

        Call between engine steps (after the engine thread stopped): SHUTDOWN is a collective.
        """
        import ray
        import torch.distributed as dist

        self._stopping.set()
        if self.policy is not None:
            self.policy.stop()
        if self._started_ray and not self.ray_alive():
            # The private cluster is gone (a signal to the whole process group reached Ray's processes
            # too): every Ray call would wait for its GCS to come back (a minute). Nothing is left to stop.
            log.warning("expert pool: the private Ray cluster has already stopped (signalled with this "
                        "process group?); not waiting for it")
            self.clean = False
            self.dispatcher, self.actors, self._pg = None, [], None
            self._remove_token()
            return
        if self.dispatcher is not None:
            try:
                # SHUTDOWN is a collective: only with every worker still there to take part
                states = self.statuses(timeout=min(2.0, timeout))
                if not all(st["state"] == "joined" for st in states):
                    raise PoolError(f"worker states {[st['state'] for st in states]}")
                self.dispatcher.shutdown()
                ray.get(self.serve_refs, timeout=timeout)
            except Exception as e:  # a worker already gone: fall through to killing the actors
                log.warning("expert pool: workers did not stop cleanly: %s", e)
            self.dispatcher = None
        if dist.is_initialized():  # NCCL pools: the default group
            dist.destroy_process_group()
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        for pg in [self._pg, *self._extra_pgs]:
            if pg is not None:
                try:
                    ray.util.remove_placement_group(pg)
                except Exception:
                    pass
        self._pg, self._extra_pgs = None, []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
        self._remove_token()
        self.shutdown_done = True

    def _remove_token(self) -> None:
        """Remove the private cluster's token and the settings that pointed at it (a later pool in
        this process makes its own)."""
        if self._token_dir is not None:
            import shutil
            shutil.rmtree(self._token_dir, ignore_errors=True)
            self._token_dir = None
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
            if self._saved_auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._saved_auth_mode
            self._reload_ray_auth()

    @staticmethod
    def _reload_ray_auth() -> None:
        """Make this process's Ray read its auth settings (and token) again: it caches both."""
        from ray._raylet import AuthenticationTokenLoader, Config
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

