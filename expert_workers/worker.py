"""One expert rank: load this rank's experts, join the mesh's process group, serve every MoE layer.

`ExpertWorker` is a plain class (testable without Ray); `RayExpertWorker` is the thin actor shell.
The actor runs `serve()` in one thread and answers `status()` from another, so the control plane can
watch a worker that is blocked in a collective.
"""

from __future__ import annotations

import os
import socket
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


class ExpertWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.state = "created"  # created -> loading -> loaded -> joined -> stopped | failed
        self.error: str | None = None
        self.server = None
        self.loaded_bytes = 0
        self.load_seconds = 0.0

    def placement(self) -> Placement:
        s = self.spec
        cfg = ModelConfig.from_dir(s.model_dir)
        return Placement(torch.tensor(s.phy2log, dtype=torch.int64), s.num_ranks, s.slots_per_rank,
                         cfg.num_experts)

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
            cfg = ModelConfig.from_dir(s.model_dir)
            placement = self.placement()
            shard = load_experts(s.model_dir, cfg, DTYPES[s.dtype], slots=placement.local_slots(s.expert_rank),
                                 device=s.device, reader=open_reader(s.model_dir, s.load_format, s.device,
                                                                     seed=1 + s.expert_rank))
            # the backend's expert compute (the CPU's packs the weights once and drops the stacked copies)
            make_backend(s.backend, s.device, cfg.rms_norm_eps, threads=s.threads).prepare_experts(shard)
            self.loaded_bytes = shard.nbytes
            self.load_seconds = time.perf_counter() - t0
            self.state = "loaded"
            gpu = s.device.startswith("cuda")
            if gpu:
                torch.cuda.set_device(torch.device(s.device).index or 0)
            init_mesh_group(s.init_method, s.num_attention + s.num_ranks, s.num_attention + s.expert_rank,
                            backend="nccl" if gpu else "gloo")
            self.server = ExpertServer(shard, placement, s.num_attention, device=s.device)
            _export_worker_metrics(self.server, s.expert_rank)
            self.state = "joined"
            steps = self.server.run()
            self.state = "stopped"
            dist.destroy_process_group()
            telemetry.shutdown()
            return steps
        except BaseException:
            self.state = "failed"
            self.error = traceback.format_exc()
            raise

    def status(self) -> dict:
        srv = self.server
        return {"rank": self.spec.expert_rank, "state": self.state, "error": self.error,
                "host": socket.gethostname(), "pid": os.getpid(), "loaded_bytes": self.loaded_bytes,
                "load_seconds": self.load_seconds,
                "steps": srv.steps if srv is not None else 0,
                "compute_seconds": srv.compute_seconds if srv is not None else 0.0}


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

    @ray.remote(max_concurrency=2)  # one thread serves the collective loop, one answers status()
    class RayExpertWorker:
        def __init__(self, spec: WorkerSpec):
            self.worker = ExpertWorker(spec)

        def serve(self) -> int:
            return self.worker.serve()

        def status(self) -> dict:
            return self.worker.status()

    return RayExpertWorker
