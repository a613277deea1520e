"""One expert rank: load this rank's experts, join the mesh's process group, serve every MoE layer.

`ExpertWorker` is a plain class (testable without Ray); `RayExpertWorker` is the thin actor shell.
The actor runs `serve()` in one thread and answers `status()` from another, so the control plane can
watch a worker that is blocked in a collective.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from mesh.config import DTYPES, ModelConfig
from mesh.model.backend import make_backend
from mesh.model.loader import load_experts, open_reader
from mesh.parallel.placement import Placement


@dataclass
class WorkerSpec:
    model_dir: str
    dtype: str
    expert_rank: int  # 0..W-1
    num_attention: int  # A: gateway ranks 0..A-1 in the group
    phy2log: list[list[int]]  # the placement, identical on every rank (the handshake checks it)
    num_ranks: int
    slots_per_rank: int
    init_method: str  # tcp://host:port of the group's rendezvous
    threads: int = 1
    device: str = "cpu"
    backend: str = "auto"  # the expert compute's backend (EngineConfig.backend)
    load_format: str = "auto"  # "dummy": random weights made on the device (seeded by the rank)
    # a worker added to a running pool joins the pool's next group (collective.new_group) on this
    # host:port instead of the default group of init_method
    group_host: str = ""
    group_port: int = 0


class ExpertWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.state = "created"  # created -> loading -> loaded -> joined -> stopped | failed
        self.error: str | None = None
        self.server = None
        self.loaded_bytes = 0
        self.load_seconds = 0.0
        self.attached: set = set()  # ExpertServers of other gateways' groups (attach)
        self.compute_lock = threading.Lock()  # one expert compute at a time across those servers

    def placement(self) -> Placement:
        s = self.spec
        return self._placement_of(s.phy2log, s.num_ranks, s.slots_per_rank)

    def _placement_of(self, phy2log: list[list[int]], num_ranks: int, slots_per_rank: int) -> Placement:
        cfg = ModelConfig.from_dir(self.spec.model_dir)
        return Placement(torch.tensor(phy2log, dtype=torch.int64), num_ranks, slots_per_rank, cfg.num_experts)

    def _load(self, slots: list[list[int]], rank: int):
        """This worker's experts for `slots` (per MoE layer, the logical expert of each local slot),
        from the checkpoint (or random ones seeded by `rank`), prepared for the backend's compute (the
        CPU's packs the weights once and drops the stacked copies)."""
        s = self.spec
        cfg = ModelConfig.from_dir(s.model_dir)
        shard = load_experts(s.model_dir, cfg, DTYPES[s.dtype], slots=slots, device=s.device,
                             reader=open_reader(s.model_dir, s.load_format, s.device, seed=1 + rank))
        make_backend(s.backend, s.device, cfg.rms_norm_eps, threads=s.threads).prepare_experts(shard)
        return shard

    def _join_next_group(self, placement: Placement, host: str, port: int, rank: int):
        """Join the pool's next group (`new_group` on host:port) as expert rank `rank` of `placement`
        and pass its handshake, beside the group this worker serves on."""
        from mesh.parallel.collective import group_handshake, mesh_layout, new_group
        s = self.spec
        cfg = ModelConfig.from_dir(s.model_dir)
        group = new_group(host, port, s.num_attention + placement.num_ranks, s.num_attention + rank)
        group_handshake(group, mesh_layout(s.num_attention, placement, cfg.hidden_size, DTYPES[s.dtype]))
        return group

    def serve(self) -> int:
        """Load, join, and serve until the gateway sends SHUTDOWN. Returns the steps served."""
        import torch.distributed as dist

        from mesh.parallel.collective import ExpertServer, init_mesh_group

        s = self.spec
        # Ray starts actors with OMP_NUM_THREADS=1; set the intra-op threads this rank may use.
        torch.set_num_threads(max(1, s.threads))
        from mesh import telemetry
        telemetry.setup("mesh-expert-worker")  # OTEL_* come from the gateway's environment
        try:
            self.state = "loading"
            t0 = time.perf_counter()
            placement = self.placement()
            shard = self._load(placement.local_slots(s.expert_rank), s.expert_rank)
            self.loaded_bytes = shard.nbytes
            self.load_seconds = time.perf_counter() - t0
            self.state = "loaded"
            gpu = s.device.startswith("cuda")
            if gpu:
                torch.cuda.set_device(torch.device(s.device).index or 0)
            group = None
            if s.group_port:  # added at runtime: the new pool's own group
                from mesh.parallel.collective import new_group
                group = new_group(s.group_host, s.group_port, s.num_attention + s.num_ranks,
                                  s.num_attention + s.expert_rank)
            else:
                init_mesh_group(s.init_method, s.num_attention + s.num_ranks, s.num_attention + s.expert_rank,
                                backend="nccl" if gpu else "gloo")
            self.server = ExpertServer(shard, placement, s.num_attention, group=group, device=s.device,
                                       compute_lock=self.compute_lock)
            _export_worker_metrics(self.server, s.expert_rank)
            self.state = "joined"
            steps = self.server.run()
            self.state = "left" if self.server.left else "stopped"
            if dist.is_initialized() and not self.server.left:  # a leaving rank's peers may still use it
                dist.destroy_process_group()
            telemetry.shutdown()
            return steps
        except BaseException:
            self.state = "failed"
            self.error = traceback.format_exc()
            raise

    def leave(self, phy2log: list[list[int]], num_ranks: int, slots_per_rank: int) -> dict:
        """This rank is not in the new placement's pool: stop serving at its SWITCH."""
        new = self._placement_of(phy2log, num_ranks, slots_per_rank)
        return {"rank": self.spec.expert_rank, "fingerprint": self.server.stage_leave(new), "loaded_bytes": 0,
                "new_experts": 0, "seconds": 0.0}

    def prepare(self, phy2log: list[list[int]], num_ranks: int, slots_per_rank: int, group_host: str = "",
                group_port: int = 0) -> dict:
        """Load this rank's slots of a new placement from the checkpoint while `serve` keeps serving
        (another actor thread), and stage them for the gateway's SWITCH. Returns the placement's
        fingerprint, the bytes loaded, the seconds it took and how many (layer, expert) pairs are new
        to this rank."""
        s = self.spec
        if self.server is None or self.state != "joined":
            raise RuntimeError(f"expert worker {s.expert_rank} is {self.state}: it can take a new placement "
                               f"only once it serves")
        t0 = time.perf_counter()
        new = self._placement_of(phy2log, num_ranks, slots_per_rank)
        # the serving loops of this and every other process come first
        shard = _behind_serving(lambda: self._load(new.local_slots(s.expert_rank), s.expert_rank))
        nbytes = shard.nbytes
        new_experts = self.server.placement.moved_slots(new)[s.expert_rank]
        # the pool changes membership: join its next group now, beside the serving one
        group = self._join_next_group(new, group_host, group_port, s.expert_rank) if group_port else None
        fp = self.server.stage(new, shard, group=group)
        return {"rank": s.expert_rank, "fingerprint": fp, "loaded_bytes": nbytes,
                "new_experts": new_experts, "seconds": time.perf_counter() - t0}

    def recover(self, phy2log: list[list[int]], num_ranks: int, slots_per_rank: int, group_host: str,
                group_port: int, new_rank: int) -> dict:
        """The pool lost a member and re-forms without it: this worker becomes expert rank `new_rank`
        of `phy2log`'s placement. It keeps its shard when its slots are unchanged (else loads them from
        the checkpoint), joins the new group on group_host:group_port, and hands both to its serve
        loop, which leaves the broken group for them. Returns what `prepare` does."""
        s = self.spec
        srv = self.server
        if srv is None or self.state != "joined":
            raise RuntimeError(f"expert worker {s.expert_rank} is {self.state}: only a serving worker re-forms")
        t0 = time.perf_counter()
        new = self._placement_of(phy2log, num_ranks, slots_per_rank)
        slots, old = new.local_slots(new_rank), srv.placement.local_slots(srv.rank - srv.A)
        if slots == old:
            shard, nbytes = srv.experts, 0  # nothing moved here: the shard in memory serves on
        else:
            shard = self._load(slots, new_rank)
            nbytes = shard.nbytes
        new_experts = sum(len(set(n) - set(o)) for n, o in zip(slots, old))  # (layer, expert) pairs new here
        group = self._join_next_group(new, group_host, group_port, new_rank)
        fp = srv.stage_recovery(new, shard, group)
        s.expert_rank = new_rank
        return {"rank": new_rank, "fingerprint": fp, "loaded_bytes": nbytes, "new_experts": new_experts,
                "seconds": time.perf_counter() - t0}

    def attach(self, group_host: str, group_port: int, phy2log: list[list[int]], num_ranks: int,
               slots_per_rank: int) -> dict:
        """Serve another gateway too: join a group of its own with it (its TCP store on
        group_host:group_port, gateway rank 0, this worker rank 1 + its expert rank), from the shard
        this worker holds for that placement, in a thread of its own. Returns once the group's
        handshake passed; the thread ends when that gateway leaves or its group breaks."""
        from mesh.parallel.collective import ExpertServer, new_group
        s, srv = self.spec, self.server
        if srv is None or self.state != "joined":
            raise RuntimeError(f"expert worker {s.expert_rank} is {self.state}: only a serving worker attaches")
        placement = self._placement_of(phy2log, num_ranks, slots_per_rank)
        if placement.fingerprint() != srv.placement.fingerprint():
            raise RuntimeError(f"attach: placement {placement.fingerprint():#x} is not this worker's "
                               f"({srv.placement.fingerprint():#x})")
        rank = srv.rank - srv.A
        group = new_group(group_host, group_port, 1 + num_ranks, 1 + rank)
        attached = ExpertServer(srv.experts, placement, 1, group=group, device=s.device, orphan_wait_s=0.0,
                                compute_lock=self.compute_lock)

        def serve():
            try:
                attached.run()
            except Exception as e:  # noqa: BLE001 - that gateway left or its group broke: this loop ends
                import logging
                logging.getLogger("mesh.worker").warning("expert worker %d: the loop of the gateway at %s:%d "
                                                         "ended: %s", rank, group_host, group_port,
                                                         str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            finally:
                self.attached.discard(attached)

        self.attached.add(attached)
        threading.Thread(target=serve, name=f"mesh-attached-{group_port}", daemon=True).start()
        return {"rank": rank, "fingerprint": placement.fingerprint()}

    def status(self) -> dict:
        srv = self.server
        return {"rank": self.spec.expert_rank, "state": self.state, "error": self.error,
                "host": socket.gethostname(), "pid": os.getpid(), "loaded_bytes": self.loaded_bytes,
                "load_seconds": self.load_seconds,
                "steps": srv.steps if srv is not None else 0,
                "switches": srv.switches if srv is not None else 0,
                "recoveries": srv.recoveries if srv is not None else 0,
                "gateways": 1 + len(self.attached),
                "slots": srv.placement.local_slots(srv.rank - srv.A) if srv is not None and not srv.left else None,
                "compute_seconds": srv.compute_seconds if srv is not None else 0.0}


# Niceness of the thread that loads a new placement's experts while the pool serves (Linux: per
# thread). Serving threads, here and in the gateway, then win the CPU whenever both want it, so a
# rebalance or scale costs the steps that run meanwhile less; the load takes longer only on a busy CPU.
LOAD_NICE = 10


def _behind_serving(fn):
    """fn() in a thread of its own at niceness LOAD_NICE (where the OS lets a thread lower its own
    priority); returns its result or raises its error."""
    box: dict = {}

    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICE)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass  # elsewhere: at the caller's priority
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="mesh-load", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _export_worker_metrics(server, rank: int) -> None:
    """Observable counters read from the server's own totals (nothing added on the hot path)."""
    from opentelemetry.metrics import Observation

    from mesh import telemetry

    m, attrs = telemetry.meter(), {telemetry.ATTR_RANK: rank}

    def reader(fn):
        return [lambda _: [Observation(fn(), attrs)]]

    m.create_observable_counter(telemetry.M_WORKER_STEPS, reader(lambda: server.steps), unit="{step}",
                                description="steps this expert rank served")
    m.create_observable_counter(telemetry.M_WORKER_ROWS, reader(lambda: int(server.slot_load.sum())),
                                unit="{row}", description="token rows this expert rank computed, all layers")
    m.create_observable_counter(telemetry.M_WORKER_COMPUTE, reader(lambda: sum(server.compute_seconds)),
                                unit="s", description="expert compute time on this rank")
    m.create_observable_counter(
        telemetry.M_WORKER_BYTES,
        [lambda _: [Observation(server.total_bytes_sent, {**attrs, "direction": "sent"}),
                    Observation(server.total_bytes_received, {**attrs, "direction": "received"})]],
        unit="By", description="bytes this expert rank moved through the collectives")


def make_actor_class():
    """The Ray actor shell, built on demand so importing this module does not import Ray."""
    import ray

    # one thread serves the collective loop, one answers status(), one loads a new placement (prepare,
    # recover), one spare: a status() call must never queue behind a slow load
    @ray.remote(max_concurrency=8)
    class RayExpertWorker:
        def __init__(self, spec: WorkerSpec):
            self.worker = ExpertWorker(spec)

        def serve(self) -> int:
            return self.worker.serve()

        def status(self) -> dict:
            return self.worker.status()

        def prepare(self, phy2log, num_ranks, slots_per_rank, group_host="", group_port=0) -> dict:
            return self.worker.prepare(phy2log, num_ranks, slots_per_rank, group_host, group_port)

        def leave(self, phy2log, num_ranks, slots_per_rank) -> dict:
            return self.worker.leave(phy2log, num_ranks, slots_per_rank)

        def recover(self, phy2log, num_ranks, slots_per_rank, group_host, group_port, new_rank) -> dict:
            return self.worker.recover(phy2log, num_ranks, slots_per_rank, group_host, group_port, new_rank)

        def attach(self, group_host, group_port, phy2log, num_ranks, slots_per_rank) -> dict:
            return self.worker.attach(group_host, group_port, phy2log, num_ranks, slots_per_rank)

    return RayExpertWorker
