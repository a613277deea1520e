"""`mesh serve --join HOST:PORT`: a gateway that serves from another gateway's expert pool.

The gateway at HOST:PORT (the pool's owner: `mesh serve --workers N --admin-token-file F`) started the
expert workers. A joined gateway loads the same checkpoint's dense layers, reads the pool's placement
(Admin GetPool), opens a TCP store of its own and asks the owner to attach it (Admin AttachGateway):
every worker then joins a group with this gateway alone and serves it from another thread, from the
experts it already holds. Gateways do not step in lockstep; each has its own group with the workers.

A rebalance on the owner leaves the attached groups on the experts they were formed with (the
workers keep those alive for them). When a joined gateway's group breaks (a worker lost, or removed
by a scale-down), it attaches again to the pool as it is then, and the interrupted step's sequences
run again there (the engine requeues them). If the owner cannot be reached for `REJOIN_S`, its steps
fail with the reason and the gateway stops with exit code 1.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import timedelta

import torch

from mesh.config import DTYPES, ModelConfig
from mesh.parallel.collective import CollectiveDispatcher, free_port, group_handshake, new_group
from mesh.parallel.placement import Placement

log = logging.getLogger("mesh.join")

REJOIN_S = 120.0  # how long a joined gateway keeps trying to attach again before it gives up


def _advertised_host(owner_host: str) -> str:
    """The address of this machine that the pool's workers can reach: the one its route to the owner
    leaves from (loopback when the owner is on this machine)."""
    if owner_host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((owner_host, 9))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


class JoinedPool:
    """The joined gateway's end of another gateway's expert pool."""

    def __init__(self, owner: str, admin_token: str | None, model_dir: str, dtype: str, device: str = "cpu",
                 timeout: float = 120.0):
        from router_service.client import MeshClient
        if device != "cpu":
            raise ValueError("--join is implemented for CPU (gloo) pools only")
        self.owner, self.model_dir, self.dtype, self.timeout = owner, str(model_dir), dtype, timeout
        self.cfg = ModelConfig.from_dir(model_dir)
        self.client = MeshClient(owner, timeout=timeout, admin_token=admin_token)
        self.host = _advertised_host(owner.rsplit(":", 1)[0])
        self.dispatcher: CollectiveDispatcher | None = None
        self.attachments = 0
        self._trouble = threading.Event()
        self._stopping = threading.Event()

    def _placement(self) -> Placement:
        pool = self.client.get_pool()
        W, S, E = int(pool["num_workers"]), int(pool["slots_per_rank"]), int(pool["num_experts"])
        if E != self.cfg.num_experts or len(pool["layers"]) != self.cfg.num_moe_layers:
            raise ValueError(f"--join {self.owner}: its pool serves {E} experts x {len(pool['layers'])} MoE layers, "
                             f"--model {self.model_dir} has {self.cfg.num_experts} x {self.cfg.num_moe_layers}: "
                             f"give the checkpoint the owner serves")
        rows = [[int(x) for x in layer["slots"]] for layer in pool["layers"]]
        placement = Placement(torch.tensor(rows, dtype=torch.int64), W, S, E)
        if placement.fingerprint() != int(pool.get("placement_fingerprint", 0)):
            raise RuntimeError("the placement read does not match its fingerprint")
        return placement

    def _attach(self, build) -> None:
        """Read the placement, open this gateway's store, ask the owner to attach; `build(placement,
        group)` runs beside the call (the group's first collective needs both sides)."""
        placement = self._placement()
        port = free_port(self.host)
        box: dict = {}

        def form():
            try:
                group = new_group(self.host, port, 1 + placement.num_ranks, 0,
                                  timeout=timedelta(seconds=self.timeout))
                build(placement, group)
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                box["error"] = e

        t = threading.Thread(target=form, name="mesh-join", daemon=True)
        t.start()
        # on an error the group never forms; its thread times out on its own
        self.client.attach_gateway(self.host, port, placement.fingerprint(), self.timeout)
        t.join(self.timeout)
        if t.is_alive() or "error" in box:
            raise RuntimeError(f"the group with the pool's workers did not form: {box.get('error', 'timed out')}")
        self.attachments += 1
        log.info("joined the expert pool of %s: %d workers, %d slots each (group store %s:%d)", self.owner,
                 placement.num_ranks, placement.slots_per_rank, self.host, port)

    def start(self) -> CollectiveDispatcher:
        def build(placement, group):
            self.dispatcher = CollectiveDispatcher(placement, 1, self.cfg.hidden_size, DTYPES[self.dtype], group=group)
        self._attach(build)
        self.dispatcher.on_lost = lambda reason: self._trouble.set()
        threading.Thread(target=self._supervise, name="mesh-join-supervisor", daemon=True).start()
        return self.dispatcher

    def _supervise(self) -> None:
        """On a broken group: attach again to the pool as it is now, and hand the new group to the
        engine's next step; give up after REJOIN_S."""
        from router_service.client import MeshError
        while not self._stopping.is_set():
            if not self._trouble.wait(0.5):
                continue
            self._trouble.clear()
            if self._stopping.is_set():
                return
            log.warning("the group with the pool of %s broke; attaching again", self.owner)
            deadline, last = time.monotonic() + REJOIN_S, None
            while not self._stopping.is_set():
                try:
                    def build(placement, group):
                        group_handshake(group, self.dispatcher.layout(placement))
                        self.dispatcher.install_recovery(placement, group)
                    self._attach(build)
                    break
                except (MeshError, RuntimeError, ValueError) as e:
                    last = e
                    if time.monotonic() > deadline:
                        self.dispatcher.give_up(f"the expert pool this gateway joined at {self.owner} cannot be "
                                                f"reached again ({last}); restart this gateway to join anew")
                        return
                    time.sleep(1.0)

    def shutdown(self) -> None:
        """Leave the pool (after the engine stopped): the workers' loops for this gateway end."""
        self._stopping.set()
        if self.dispatcher is not None:
            try:
                self.dispatcher.shutdown()
            except Exception as e:  # noqa: BLE001 - the workers' loops end when the group breaks anyway
                log.warning("leaving the expert pool of %s: %s", self.owner, e)
        self.client.close()
