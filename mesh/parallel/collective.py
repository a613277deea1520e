"""The torch.distributed dispatcher: attention ranks send rows to expert ranks and back, per MoE layer.

One process group of A attention ranks (gateways, ranks 0..A-1, hold no experts) and W expert ranks
(ranks A..A+W-1; expert rank w = group rank - A). `CollectiveDispatcher` is the attention side of the
Dispatcher protocol; `ExpertServer` is the expert side's run loop. gloo on CPU, NCCL on GPU: the code
only moves tensors on `device`.

Wire protocol, in this order on every rank (all collectives span the whole group):
0. once, at construction: all_gather int64 [9] (version, A, W, slots_per_rank, E, MoE layers, H,
   dtype code, placement fingerprint). Any disagreement raises the same ValueError on every rank.
1. per step: all_gather int64 header [8] = [kind, num_tokens, step_id, trace_id_hi, trace_id_lo,
   span_id, flags, 0] (expert ranks send zeros but for the last element: their compute
   microseconds since start, which the attention ranks keep as `worker_compute_seconds`). kind
   STEP on every attention rank starts a step; SHUTDOWN from any attention rank ends the expert
   loops (and fails the peers' begin_step). kind SWITCH (one attention rank only) carries a placement
   fingerprint in element 3: every expert rank swaps to the shard it staged for that placement
   (`ExpertServer.stage`, loaded in the background while serving) and no layers follow; the next
   header round starts a step on the new placement. The gateway sends it only after every expert rank
   reported that placement staged, so the switch costs one header round between two steps.
2. per MoE layer 0..L-1, in order:
   a. all_to_all_single of int64 [world, S] with equal splits: the per-local-slot row counts that each
      attention rank sends to each expert rank (zeros on every other pair).
   b. all_to_all_single of rows [N, H] in the model dtype with uneven splits: attention rank a sends
      expert rank w its rows for w, sorted by local slot. Local slot ids are not sent: they are
      implied by the counts of step a, rows arriving grouped slot by slot. Gate weights stay on the
      attention side, which does the weighted sum.
   c. all_to_all_single of expert outputs [N, H], splits reversed: each expert rank returns every
      source's rows in the order they arrived.
Every rank must reach every one of these collectives with matching splits, else all ranks hang:
attention ranks send 0 rows to attention ranks, expert ranks send 0 rows to expert ranks, and an
idle gateway still joins each step with 0 tokens (see `idle_step`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mesh import telemetry
from mesh.model.dispatch import ExpertsLost, ExpertsUnavailable
from mesh.model.moe import ExpertShard, weighted_scatter
from mesh.parallel.placement import Placement, pick_replicas

STEP, SHUTDOWN, SWITCH = 1, 2, 3
ECHO = 1  # header flag: expert ranks return rows unchanged (measures transport alone)
MB_SHIFT = 8  # header flags bits 8..15: micro-batches per step (each MoE layer serves that many exchanges)
HEADER_LEN = 8
_MASK64 = (1 << 64) - 1
PROTOCOL_VERSION = 1
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HANDSHAKE = ["protocol version", "attention ranks", "expert ranks", "slots per rank", "experts",
              "MoE layers", "hidden size", "dtype", "placement fingerprint"]

log = logging.getLogger("mesh.collective")

# Expert ranks block in the step-header collective whenever no request is running, possibly for
# hours; gloo and NCCL would otherwise fail that wait after the default 30 minutes. Liveness of a
# stuck peer is the control plane's job (Ray health checks), not the collective timeout's.
GROUP_TIMEOUT = timedelta(days=365)
# gloo waits are polled at this interval so that another thread can make a rank give up a group whose
# peer died (`_MeshRank.abandon`); a wait that completes returns at once, not at the next poll.
POLL = timedelta(milliseconds=200)
# How long an expert rank whose group broke waits for the gateway to re-form the pool around it.
ORPHAN_WAIT_S = 300.0


class CollectiveFailed(RuntimeError):
    """A collective of the mesh's group failed (a peer died: gloo's connection errors) or was abandoned
    (`_MeshRank.abandon` set while waiting). The group is unusable from here on."""


def init_mesh_group(init_method: str, world_size: int, rank: int, backend: str | None = None) -> None:
    """Join the mesh's default process group (NCCL when CUDA is present, else gloo)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=GROUP_TIMEOUT)


def mesh_layout(num_attention: int, placement: Placement, hidden_size: int, dtype: torch.dtype,
                slots_per_rank: int | None = None, num_layers: int | None = None) -> list[int]:
    """A rank's row of the handshake (`_HANDSHAKE`'s fields) for `placement`; an expert rank gives
    the slots and layers of the shard it actually holds, so that a shard of the wrong shape fails it."""
    return [PROTOCOL_VERSION, num_attention, placement.num_ranks,
            placement.slots_per_rank if slots_per_rank is None else slots_per_rank, placement.num_experts,
            placement.num_layers if num_layers is None else num_layers, hidden_size, _DTYPES.index(dtype),
            placement.fingerprint()]


def free_port(host: str) -> int:
    """A port free on `host` now, for a group's TCP store (its rank 0 binds it next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def new_group(host: str, port: int, world_size: int, rank: int, timeout: timedelta = timedelta(seconds=300)):
    """A gloo process group of its own (its own TCP store on host:port, rank 0 serving it), formed
    beside the default group: how a pool changes its membership (torch.distributed cannot grow a
    group). Blocks until all `world_size` members joined."""
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(f"mesh-{port}/", store), rank, world_size, GROUP_TIMEOUT)


def _keep_forever(group) -> None:
    """A group given up after a lost member may still run a wait that will never end (a peer that
    stopped answering without closing its connection). Destroying it would join that thread
    (ProcessGroupGloo's destructor does), so it is never destroyed: one leaked reference keeps it, and
    the thread, until the process exits."""
    import ctypes
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))


def _is_raw(group) -> bool:
    return isinstance(group, dist.ProcessGroupGloo)


def group_handshake(group, layout: list[int]) -> None:
    """The construction-time handshake of a mesh on `group`, for members that join a new group while
    their _MeshRank keeps serving on the old one."""
    x = torch.tensor(layout, dtype=torch.int64)
    out = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(out, x, group=group)
    table = torch.stack(out)
    for r in range(table.shape[0]):
        for i, name in enumerate(_HANDSHAKE):
            if table[r, i] != table[0, i]:
                raise ValueError(f"mesh handshake: rank {r} has {name}={int(table[r, i])}, rank 0 has "
                                 f"{int(table[0, i])}; every rank must run the same model and placement")


def _u64_halves(x: int) -> tuple[int, int]:
    """Split an unsigned 128-bit trace id into two signed int64 halves (tensor elements are signed)."""
    def s64(v):
        return v - (1 << 64) if v >= 1 << 63 else v
    return s64((x >> 64) & (2**64 - 1)), s64(x & (2**64 - 1))


class _MeshRank:
    """What both sides share: group geometry, the handshake, byte counters and the exchange helper."""

    def __init__(self, placement: Placement, num_attention: int, group, device, layout: list[int]):
        self.placement = placement
        self.group = group
        self.rank = group.rank() if _is_raw(group) else dist.get_rank(group)
        self.world = group.size() if _is_raw(group) else dist.get_world_size(group)
        self.A, self.W = num_attention, placement.num_ranks
        self.S, self.L = placement.slots_per_rank, placement.num_layers
        if self.world != self.A + self.W:
            raise ValueError(f"group has {self.world} ranks, expected {self.A} attention + {self.W} expert")
        if device is None:
            nccl = not _is_raw(group) and dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.step_bytes_sent = self.step_bytes_received = 0
        self.total_bytes_sent = self.total_bytes_received = 0
        self.steps = 0
        self.layer_seconds = [0.0] * self.L  # cumulative, per MoE layer
        self.retired_groups: list = []  # default groups of earlier memberships (NCCL), kept until shutdown
        # set by another thread: give up the pending and any further waits on this group (it broke)
        self.abandon = threading.Event()
        self._polled = self.device.type == "cpu"  # gloo; an NCCL wait is a stream dependency, not a block
        self._handshake(layout)

    def _handshake(self, mine: list[int]) -> None:
        table = self._gather(torch.tensor(mine, dtype=torch.int64))  # [world, 9]
        for r in range(self.world):
            for i, name in enumerate(_HANDSHAKE):
                if table[r, i] != table[0, i]:
                    raise ValueError(f"mesh handshake: rank {r} has {name}={int(table[r, i])}, rank 0 has "
                                     f"{int(table[0, i])}; every rank must run the same model and placement")

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """all_gather a small int64 vector from every rank -> [world, n] on the CPU."""
        x = x.to(self.device)
        out = [torch.empty_like(x) for _ in range(self.world)]
        try:
            work = dist.all_gather(out, x, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._failed(e) from e
        self._wait(work)
        self._count(x.numel() * 8, x.numel() * 8 * self.world)
        return torch.stack(out).cpu()

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, async_op=False):
        # Collective over the whole group: every rank must call this, in the same order.
        try:
            if _is_raw(self.group):  # a group formed by new_group: its own all-to-all entry point
                work = self.group.alltoall_base(out, inp, out_splits or [], in_splits or [], dist.AllToAllOptions())
            else:
                work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._failed(e) from e
        if not async_op:
            self._wait(work)
            work = None
        self._count(inp.numel() * inp.element_size(), out.numel() * out.element_size())
        return work

    def _retire(self, group) -> None:
        """The previous membership's group, right after its last (SWITCH) round: nothing is pending on
        it. A group of the pool's own is torn down as this reference goes (its connections and TCP
        store closed); torch.distributed's default group (NCCL pools) stays until shutdown destroys it."""
        if not _is_raw(group):
            self.retired_groups.append(group)

    def _wait(self, work) -> None:
        """Wait for a collective; a peer's death (gloo's error) or `abandon` raises `_failed`'s error.
        On gloo the wait is polled, so that a rank blocked on a peer that will never answer (a ring
        neighbour stuck behind the dead one) can still give up when told to."""
        if not self._polled:
            try:
                work.wait()
            except RuntimeError as e:
                raise self._failed(e) from e
            return
        while True:
            try:
                work.wait(timeout=POLL)
                return
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise self._failed(e) from e
            if self.abandon.is_set():
                raise self._failed(None)

    def _failed(self, error: BaseException | None) -> Exception:
        """The exception a failed (`error`) or abandoned (None) collective raises on this rank."""
        if error is None:
            return CollectiveFailed("the mesh's group was abandoned while this rank waited on it")
        return CollectiveFailed(f"a collective of the mesh's group failed (a peer died?): {error}")

    def _count(self, sent: int, received: int) -> None:
        self.step_bytes_sent += sent
        self.step_bytes_received += received
        self.total_bytes_sent += sent
        self.total_bytes_received += received


@dataclass
class _Handle:
    moe_index: int
    rows: torch.Tensor  # [N, H] rows sent, sorted by (expert rank, local slot)
    order: torch.Tensor  # [N] flat (token, k) index of each sent row
    topk_weights: torch.Tensor  # [T, K]
    splits: list[int]  # rows per group rank (0 for attention ranks)
    works: list  # async works of counts and rows; their buffers live in this handle
    counts: tuple[torch.Tensor, torch.Tensor]
    seconds: float  # time spent inside dispatch


class CollectiveDispatcher(_MeshRank):
    """The attention-rank side. All A attention ranks call begin_step / dispatch / combine / end_step
    in lockstep (same steps, every MoE layer in order, combine before the next dispatch).

    Counters: `expert_load` [L, E] and `slot_load` [L, P] rows routed since the last reset,
    `layer_seconds` [L] dispatch + combine host seconds (on CUDA these exclude queued GPU work),
    `step_bytes_sent/received` for the current step, `total_bytes_sent/received`.
    """

    graph_capturable = False  # every layer reads its row counts on the host

    def __init__(self, placement: Placement, num_attention: int, hidden_size: int, dtype: torch.dtype,
                 group=None, device=None, worker_threads: int = 0):
        """`worker_threads`: the CPU threads each expert rank computes with, as its pool started them
        (reported in the engine's stats; 0: not known)."""
        self.hidden_size, self.dtype = hidden_size, dtype
        self.worker_threads = worker_threads
        super().__init__(placement, num_attention, group, device,
                         mesh_layout(num_attention, placement, hidden_size, dtype))
        if not 0 <= self.rank < self.A:
            raise ValueError(f"rank {self.rank} is an expert rank; attention ranks are 0..{self.A - 1}")
        self._use_placement(placement)
        self.reset_counters()
        # a placement switch asked for by another thread, applied by the engine thread between steps
        self._switch_lock = threading.Lock()
        self._pending_switch: tuple | None = None
        self.switches = 0
        # a lost member: `abandon` set, the reason, and the re-formed pool the engine thread takes up
        self._lost_reason: str | None = None
        self._recovered = threading.Event()
        self._recovery: tuple | None = None  # (placement, group)
        self._dead: str | None = None  # the pool gave up: every later step raises ExpertsUnavailable
        self.recoveries = 0
        self.recovery_timeout = 600.0  # longest a step waits for the pool to re-form
        self._in_step = self._closed = False
        self._next_layer = 0
        self._micro_batches, self._exchanges = 1, 0
        self._pending: _Handle | None = None
        # step header + dispatch + combine host seconds since start (never reset), and this thread's CPU in them
        self.expert_seconds = self.expert_cpu_seconds = 0.0
        self.worker_compute_seconds = [0.0] * self.W  # each expert rank's, as of the last header

    @property
    def num_workers(self) -> int:
        return self.W

    def layout(self, placement: Placement) -> list[int]:
        """The handshake row of this gateway for `placement` (what a new group's members compare)."""
        return mesh_layout(self.A, placement, self.hidden_size, self.dtype)

    def _use_placement(self, placement: Placement) -> None:
        if (placement.num_ranks, placement.num_layers, placement.num_experts) != \
                (self.W, self.L, self.placement.num_experts):
            raise ValueError(f"a placement switch keeps the ranks and layers: got {placement.num_ranks} ranks "
                             f"x {placement.num_layers} layers x {placement.num_experts} experts, the group has "
                             f"{self.W} x {self.L} x {self.placement.num_experts}")
        self.placement, self.S = placement, placement.slots_per_rank
        # Without replicas every expert has exactly one slot: logical -> physical is one lookup, and
        # the per-expert counters follow from the slot counts (no second bincount over the ids).
        self._single = bool((placement.logcnt == 1).all())
        self._slot_of = placement.log2phy[:, :, 0].to(self.device) if self._single else None  # [L, E]
        # with replicas: the tables each step's choice reads, on the device once per placement
        self._replicas = None if self._single else (placement.log2phy.to(self.device), placement.logcnt.to(self.device))
        self.slot_load = torch.zeros(self.L, placement.num_slots, dtype=torch.int64)

    def reset_counters(self) -> None:
        self.expert_load = torch.zeros(self.L, self.placement.num_experts, dtype=torch.int64)
        self.slot_load = torch.zeros(self.L, self.placement.num_slots, dtype=torch.int64)
        self.layer_seconds = [0.0] * self.L

    # ---- placement switches (live rebalancing) ---------------------------------------------
    def request_switch(self, placement: Placement, group=None) -> threading.Event:
        """Ask for `placement` from the next step boundary on (any thread). Every expert rank must
        already hold it staged (`ExpertServer.stage`). With `group` (a `new_group` every member of the
        new pool joined and handshook), the steps after the switch run on that group: the pool's
        membership changes. Returns an event set once the switch is done; the engine thread applies
        it at its next `begin_step` or `apply_pending` call."""
        if self.A != 1:
            raise RuntimeError("placement switches need a single attention rank")
        done = threading.Event()
        with self._switch_lock:
            if self._pending_switch is not None:
                raise RuntimeError("a placement switch is already pending")
            self._pending_switch = (placement, done, group)
        return done

    @property
    def switch_pending(self) -> bool:
        return self._pending_switch is not None

    def apply_pending(self) -> bool:
        """Engine thread, between steps: send the SWITCH header of a pending switch and use the new
        placement from the next step on. True if a switch happened."""
        if self.abandon.is_set():  # the pool is re-forming: a change staged for the old one is void
            return False
        with self._switch_lock:
            pending, self._pending_switch = self._pending_switch, None
        if pending is None:
            return False
        if self._in_step or self._closed:
            raise RuntimeError("a placement switch must be applied between steps of a running mesh")
        placement, done, group = pending
        t0 = time.perf_counter()
        self._gather(torch.tensor([SWITCH, 0, self.steps, placement.fingerprint(), int(group is not None), 0, 0, 0],
                                  dtype=torch.int64))
        self.expert_seconds += time.perf_counter() - t0
        if group is not None:  # the next header round is the new group's first
            self._retire(self.group)
            self.group, self.rank, self.world = group, group.rank(), group.size()
            self.W = placement.num_ranks
            self.worker_compute_seconds = [0.0] * self.W
        self._use_placement(placement)
        self.switches += 1
        done.set()
        return True

    # ---- a lost member: the pool re-forms the group around the survivors ----------------------
    # run (on the engine thread) when one of this side's collectives fails, with the reason: how the
    # pool's supervisor learns of a failure it has not seen yet
    on_lost = None

    def _failed(self, error: BaseException | None) -> Exception:
        if not hasattr(self, "_switch_lock"):  # the construction-time handshake: nothing to re-form yet
            return super()._failed(error)
        self._in_step, self._pending, self._next_layer, self._exchanges = False, None, 0, 0
        reason = f"a collective failed: {error}" if error is not None else "the pool's supervisor abandoned the group"
        with self._switch_lock:
            self._lost_reason = self._lost_reason or reason
            reason = self._lost_reason
            known = self.abandon.is_set()  # given up already (the pool's supervisor saw the loss first)
            self.abandon.set()
        if self.on_lost is not None and not known:  # a loss nobody has seen: tell the supervisor
            self.on_lost(reason)
        return ExpertsLost(f"the expert pool lost a member during this step ({reason}); the step runs again "
                           f"once the pool has re-formed")

    def mark_lost(self, reason: str) -> None:
        """Any thread (the pool's supervisor): a member is gone; give up the current group. A step in
        flight raises ExpertsLost, the next `begin_step` waits for `install_recovery`."""
        with self._switch_lock:
            self._lost_reason = self._lost_reason or reason
            self.abandon.set()

    @property
    def lost(self) -> bool:
        """True from a lost member until the engine thread takes up the re-formed pool."""
        return self.abandon.is_set()

    def install_recovery(self, placement: Placement, group) -> None:
        """Any thread: the re-formed pool (`group`, from `new_group`, every member joined and
        handshook for `placement`). The engine thread moves to it at its next `begin_step`; no header
        travels on the broken group."""
        with self._switch_lock:
            self._recovery = (placement, group)
        self._recovered.set()

    def give_up(self, reason: str) -> None:
        """Any thread: the pool cannot re-form; the waiting step and every later one raise
        ExpertsUnavailable(reason)."""
        self._dead = reason
        self.abandon.set()
        self._recovered.set()

    def _await_recovery(self) -> None:
        t0 = time.monotonic()
        while not self._recovered.wait(10.0):
            waited = time.monotonic() - t0
            log.warning("waiting %.0fs for the expert pool to re-form (%s)", waited, self._lost_reason)
            if waited > self.recovery_timeout and self._dead is None:
                self._dead = f"the expert pool did not re-form within {self.recovery_timeout:.0f}s after " \
                             f"losing a member ({self._lost_reason})"
        if self._dead is not None:
            self._closed = True
            raise ExpertsUnavailable(self._dead)
        with self._switch_lock:
            (placement, group), self._recovery = self._recovery, None
            self._pending_switch = None  # staged for the old pool: void
            self._recovered.clear()
            self._lost_reason = None
        _keep_forever(self.group)  # broken: never used again, never destroyed
        self.group, self.rank, self.world = group, group.rank(), group.size()
        self.W = placement.num_ranks
        self.worker_compute_seconds = [0.0] * self.W
        self._use_placement(placement)
        self.recoveries += 1
        self.abandon.clear()

    step_flags = 0  # header flags for steps the model starts (benchmarks set ECHO)
    next_step_trace = (0, 0)  # (trace id, span id) of the engine's step span, for the next header

    def set_step_trace(self, trace_id: int, span_id: int) -> None:
        self.next_step_trace = (trace_id, span_id)

    def begin_step(self, num_tokens: int, micro_batches: int = 1, trace_id: int = 0, span_id: int = 0,
                   flags: int | None = None) -> None:
        if self._closed:
            if self._dead is not None:
                raise ExpertsUnavailable(self._dead)
            raise RuntimeError("the mesh dispatcher is shut down")
        if self._in_step:
            raise RuntimeError("begin_step called twice without end_step")
        if self.abandon.is_set():
            self._await_recovery()  # a member was lost: this step runs on the re-formed pool
        if self._pending_switch is not None:
            self.apply_pending()  # a step boundary: the switch goes before this step's header
        self.step_bytes_sent = self.step_bytes_received = 0
        if not 1 <= micro_batches <= 255:
            raise ValueError(f"micro_batches must be in [1, 255], got {micro_batches}")
        flags = (self.step_flags if flags is None else flags) | (micro_batches << MB_SHIFT)
        self._micro_batches, self._exchanges = micro_batches, 0
        if not trace_id:
            trace_id, span_id = self.next_step_trace
        hi, lo = _u64_halves(trace_id)
        t0, c0 = time.perf_counter(), time.thread_time()
        headers = self._gather(torch.tensor([STEP, num_tokens, self.steps, hi, lo, _u64_halves(span_id)[1],
                                             flags, 0], dtype=torch.int64))  # [world, 8]
        self.expert_seconds += time.perf_counter() - t0  # the header round is part of the transport
        self.expert_cpu_seconds += time.thread_time() - c0
        self.worker_compute_seconds = (headers[self.A:, 7].double() / 1e6).tolist()
        if (headers[:self.A, 0] == SHUTDOWN).any():
            self._closed = True  # a peer's shutdown consumed this header round: the experts are gone
            raise RuntimeError("another attention rank shut the mesh down during this step's header")
        self._in_step, self._next_layer = True, 0

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> _Handle:
        t0, c0 = time.perf_counter(), time.thread_time()
        # Expert ranks serve layers 0..L-1 in order, each as three collectives; any other order on
        # this side would pair up mismatched collectives.
        if not self._in_step or moe_index != self._next_layer or self._pending is not None:
            raise RuntimeError(f"dispatch({moe_index}) out of order: expected layer {self._next_layer} "
                               f"inside a step, after the previous layer's combine")
        if hidden.dtype != self.dtype or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden {tuple(hidden.shape)} {hidden.dtype} does not match the mesh's "
                             f"[*, {self.hidden_size}] {self.dtype}")
        t, k = topk_ids.shape
        P, zeros = self.placement.num_slots, [0] * self.world
        if self._single:
            phys = self._slot_of[moe_index].index_select(0, topk_ids.reshape(-1))  # [T*K]
        else:
            # replica choice rotates per gateway and per step (deterministic: the same tokens, same slots)
            log2phy, logcnt = self._replicas
            phys = pick_replicas(log2phy[moe_index], logcnt[moe_index], topk_ids,
                                 offset=self.rank + self.steps).reshape(-1)  # [T*K]
        # Global slot p = w * S + local slot: sorting by p groups rows by expert rank, then slot.
        order = torch.argsort(phys, stable=True)  # [T*K]
        slot_counts = torch.bincount(phys, minlength=P)  # [P]
        host_counts = slot_counts.cpu()  # the one device -> host read of this layer
        self.slot_load[moe_index] += host_counts
        # each slot's rows counted to the expert it holds (replicas add up to their expert)
        self.expert_load[moe_index].index_add_(0, self.placement.phy2log[moe_index], host_counts)
        counts_send = torch.zeros(self.world, self.S, dtype=torch.int64, device=self.device)  # [world, S]
        counts_send[self.A:] = slot_counts.view(self.W, self.S)
        counts_recv = torch.empty_like(counts_send)
        splits = [0] * self.A + host_counts.view(self.W, self.S).sum(1).tolist()
        rows = hidden.index_select(0, torch.div(order, k, rounding_mode="floor"))  # [T*K, H]
        works = [self._a2a(counts_recv, counts_send, None, None, async_op=True),
                 self._a2a(rows[:0], rows, zeros, splits, async_op=True)]
        self._pending = _Handle(moe_index, rows, order, topk_weights, splits, works,
                                (counts_send, counts_recv), time.perf_counter() - t0)
        self.expert_cpu_seconds += time.thread_time() - c0
        return self._pending

    def combine(self, handle: _Handle) -> torch.Tensor:
        """Receive the expert outputs (the return all_to_all runs here, so whatever the caller did
        since dispatch overlapped the transfer and the expert compute) and sum them -> [T, H]."""
        t0, c0 = time.perf_counter(), time.thread_time()
        if handle is not self._pending:
            raise RuntimeError("combine got a handle that is not the pending dispatch")
        back = torch.empty_like(handle.rows)  # [N, H]
        self._a2a(back, handle.rows[:0], handle.splits, [0] * self.world)
        for w in handle.works:
            self._wait(w)
        t, k = handle.topk_weights.shape
        out = weighted_scatter(back, handle.order, handle.topk_weights, t, k).to(self.dtype)  # [T, H]
        # With M micro-batches each layer is M dispatch/combine pairs before the next layer's.
        self._pending, self._exchanges = None, self._exchanges + 1
        if self._exchanges == self._micro_batches:
            self._next_layer, self._exchanges = self._next_layer + 1, 0
        seconds = handle.seconds + time.perf_counter() - t0
        self.layer_seconds[handle.moe_index] += seconds
        self.expert_seconds += seconds
        self.expert_cpu_seconds += time.thread_time() - c0
        return out

    def end_step(self) -> None:
        if self._next_layer != self.L or self._pending is not None:
            raise RuntimeError(f"end_step after {self._next_layer} of {self.L} MoE layers: the expert ranks "
                               f"wait for every layer of every step")
        self._in_step = False
        self.steps += 1

    def idle_step(self) -> None:
        """Join one step with 0 tokens: what an idle gateway does while its peers run a step."""
        self.begin_step(0)
        empty = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        ids = torch.empty(0, 1, dtype=torch.int64, device=self.device)
        for layer in range(self.L):
            self.combine(self.dispatch(layer, empty, ids, torch.empty(0, 1, device=self.device)))
        self.end_step()

    def bare_exchange(self, slot_counts: torch.Tensor) -> list[float]:
        """Benchmark baseline: one ECHO step that moves, per MoE layer, the rows `slot_counts` [L, P]
        describes with nothing but the three raw all_to_all_single calls. Returns seconds per layer."""
        self.begin_step(0, flags=ECHO)
        zeros, seconds = [0] * self.world, []
        for layer in range(self.L):
            counts = slot_counts[layer].to(torch.int64)
            counts_send = torch.zeros(self.world, self.S, dtype=torch.int64, device=self.device)  # [world, S]
            counts_send[self.A:] = counts.view(self.W, self.S).to(self.device)
            splits = [0] * self.A + counts.view(self.W, self.S).sum(1).tolist()
            rows = torch.randn(sum(splits), self.hidden_size).to(self.dtype).to(self.device)  # [N, H]
            back = torch.empty_like(rows)
            t0 = time.perf_counter()
            self._a2a(torch.empty_like(counts_send), counts_send, None, None)
            self._a2a(rows[:0], rows, zeros, splits)
            self._a2a(back, rows[:0], splits, zeros)
            seconds.append(time.perf_counter() - t0)
            self._next_layer += 1
        self.end_step()
        return seconds

    def shutdown(self) -> None:
        """Tell the expert ranks to leave their loop. Collective: every attention rank calls it, between
        steps. Does not destroy the process group (its owner does)."""
        if self._closed:
            return
        if self.abandon.is_set():  # the group is broken: nobody to tell (the pool stops the workers)
            self._closed = True
            return
        if self._in_step:
            raise RuntimeError("shutdown inside a step: the expert ranks are waiting for MoE layers")
        self._gather(torch.tensor([SHUTDOWN, 0, self.steps, 0, 0, 0, 0, 0], dtype=torch.int64))
        self._closed = True


class ExpertServer(_MeshRank):
    """The expert-rank side: serve steps until an attention rank sends SHUTDOWN.

    `experts` holds this rank's slots (load_experts(..., slots=placement.local_slots(rank - A))).
    Counters: `slot_load` [L, S] rows served per local slot, `layer_seconds` [L] (including waits for
    rows), `compute_seconds` [L], byte counters, `last_headers` [A, 8] of the latest step.
    """

    def __init__(self, experts: ExpertShard, placement: Placement, num_attention: int, group=None,
                 device=None, orphan_wait_s: float = ORPHAN_WAIT_S, compute_lock=None):
        """`orphan_wait_s`: how long `run` waits for the pool to re-form when the group breaks (0: the
        loop ends, as for another gateway's group that gateway left). `compute_lock`: held around the
        expert compute, shared by the servers of one process that serve several gateways from one
        shard (a backend's kernels may keep scratch state)."""
        self.orphan_wait_s = orphan_wait_s
        self._compute_lock = compute_lock if compute_lock is not None else nullcontext()
        self.experts = experts
        self.dtype, self.hidden_size = experts.dtype, experts.hidden_size
        super().__init__(placement, num_attention, group, device,
                         mesh_layout(num_attention, placement, self.hidden_size, self.dtype, experts.num_slots,
                                     len(experts.layers)))
        if self.rank < self.A:
            raise ValueError(f"rank {self.rank} is an attention rank; expert ranks are {self.A}..{self.world - 1}")
        self.slot_load = torch.zeros(self.L, self.S, dtype=torch.int64)
        self.compute_seconds = [0.0] * self.L
        self.last_headers = torch.zeros(self.A, HEADER_LEN, dtype=torch.int64)
        self.node = socket.gethostname()
        self.layer_trace_every = telemetry.layer_trace_every()
        self.rows_served = 0  # rows computed since start, every layer (slot_load restarts at a switch)
        self._staged: dict[int, tuple[Placement, ExpertShard]] = {}  # fingerprint -> (placement, shard)
        self._stage_lock = threading.Lock()
        self.switches = 0
        self.left = False  # a SWITCH removed this rank from the pool
        self._recovery: tuple | None = None  # (placement, shard, group) of a re-formed pool, once staged
        self.recoveries = 0

    def stage_leave(self, placement: Placement) -> int:
        """This rank is not part of `placement`'s pool: at its SWITCH the serve loop ends."""
        fp = placement.fingerprint()
        with self._stage_lock:
            self._staged[fp] = (placement, None, None)
        return fp

    def stage(self, placement: Placement, experts: ExpertShard, group=None) -> int:
        """Hold `experts` (this rank's slots of `placement`, loaded by the caller's thread while this
        rank serves) until the gateway's SWITCH names the placement. Returns its fingerprint. With
        `group` (a `new_group` of the new pool, already handshook), steps after the switch run on it."""
        if experts.num_slots != placement.slots_per_rank or len(experts.layers) != self.L:
            raise ValueError(f"staged shard has {experts.num_slots} slots x {len(experts.layers)} layers, the "
                             f"placement {placement.slots_per_rank} x {self.L}")
        fp = placement.fingerprint()
        with self._stage_lock:
            self._staged.pop(fp, None)
            self._staged[fp] = (placement, experts, group)
            while len(self._staged) > 2:  # an abandoned stage: keep only the two newest
                self._staged.pop(next(iter(self._staged)))
        return fp

    def _switch(self, fingerprint: int) -> bool:
        """Use the staged placement from the next step on; False when this rank leaves the pool."""
        with self._stage_lock:
            staged = self._staged.pop(fingerprint, None)
            held = [f"{f:#x}" for f in self._staged]
        if staged is None:
            raise RuntimeError(f"SWITCH to placement {fingerprint:#x}, which this rank has not staged (staged: "
                               f"{held}; current {self.placement.fingerprint():#x}, {self.switches} switches)")
        placement, experts, group = staged
        if experts is None:
            self.left = True
            return False  # removed from the pool: its slots live on the survivors now
        if group is not None:
            self._retire(self.group)
            self.group, self.rank, self.world, self.W = group, group.rank(), group.size(), placement.num_ranks
        self.placement, self.experts, self.S = placement, experts, placement.slots_per_rank
        self.slot_load = torch.zeros(self.L, self.S, dtype=torch.int64)  # the old slots' shard is freed here
        self.switches += 1
        return True

    def stage_recovery(self, placement: Placement, experts: ExpertShard, group) -> int:
        """The pool re-formed without a lost member: `group` (joined and handshook) and this rank's
        shard of `placement` replace the broken group. The serve loop gives up whatever it waits for
        on the old group and serves the next step on the new one. Returns the placement's fingerprint."""
        if experts.num_slots != placement.slots_per_rank or len(experts.layers) != self.L:
            raise ValueError(f"recovery shard has {experts.num_slots} slots x {len(experts.layers)} layers, the "
                             f"placement {placement.slots_per_rank} x {self.L}")
        with self._stage_lock:
            self._recovery = (placement, experts, group)
        self.abandon.set()
        return placement.fingerprint()

    def _take_recovery(self) -> None:
        with self._stage_lock:
            (placement, experts, group), self._recovery = self._recovery, None
            self._staged.clear()  # staged for the old pool
        _keep_forever(self.group)  # broken: never used again, never destroyed
        self.group, self.rank, self.world, self.W = group, group.rank(), group.size(), placement.num_ranks
        self.placement, self.experts, self.S = placement, experts, placement.slots_per_rank
        self.slot_load = torch.zeros(self.L, self.S, dtype=torch.int64)
        self.recoveries += 1
        self.abandon.clear()

    def run(self) -> int:
        """Serve until SHUTDOWN; returns the number of steps served. When the group breaks (a peer
        died), wait up to ORPHAN_WAIT_S for the pool to re-form (`stage_recovery`) and go on there."""
        while True:
            try:
                if not self.serve_step():
                    return self.steps
            except CollectiveFailed:
                if not self.abandon.wait(self.orphan_wait_s) or self._recovery is None:
                    raise
                self._take_recovery()

    def serve_step(self) -> bool:
        """Wait for the next step header (blocking while idle) and serve its layers; False on SHUTDOWN."""
        self.step_bytes_sent = self.step_bytes_received = 0
        mine = torch.zeros(HEADER_LEN, dtype=torch.int64)
        mine[7] = int(sum(self.compute_seconds) * 1e6)  # for the gateways' step-time counters
        headers = self._gather(mine)[:self.A]  # [A, 8]
        self.last_headers = headers
        kinds = set(headers[:, 0].tolist())
        if SHUTDOWN in kinds:
            return False
        if kinds == {SWITCH}:
            return self._switch(int(headers[0, 3]))
        if kinds != {STEP}:
            raise RuntimeError(f"unknown step header kinds {sorted(kinds)}: protocol mismatch")
        flags = int(headers[0, 6])
        echo, micro_batches = bool(flags & ECHO), max(1, (flags >> MB_SHIFT) & 0xFF)
        # The gateway's step span (ids in the header) parents this rank's span for the step.
        trace_id = ((int(headers[0, 3]) & _MASK64) << 64) | (int(headers[0, 4]) & _MASK64)
        parent = telemetry.remote_parent(trace_id, int(headers[0, 5]) & _MASK64)
        every = self.layer_trace_every
        tracer = telemetry.tracer()
        with tracer.start_as_current_span(telemetry.SPAN_EXPERT_STEP, context=parent, attributes={
                telemetry.ATTR_RANK: self.rank - self.A, telemetry.ATTR_NODE: self.node,
                telemetry.ATTR_TOKENS: int(headers[:, 1].sum())}) if parent is not None else nullcontext():
            for layer in range(self.L):
                with (tracer.start_as_current_span(telemetry.SPAN_LAYER, attributes={telemetry.ATTR_LAYER: layer})
                      if parent is not None and every and self.steps % every == 0 else nullcontext()):
                    for _ in range(micro_batches):
                        self._serve_layer(layer, echo)
        self.steps += 1
        return True

    def _serve_layer(self, layer: int, echo: bool = False) -> None:
        t0 = time.perf_counter()
        A, S, zeros = self.A, self.S, [0] * self.world
        counts_recv = torch.empty(self.world, S, dtype=torch.int64, device=self.device)  # [world, S]
        self._a2a(counts_recv, torch.zeros_like(counts_recv), None, None)
        counts = counts_recv[:A].cpu()  # [A, S] rows per (source attention rank, local slot)
        per_source = counts.sum(1).tolist() + [0] * self.W
        recv = torch.empty(sum(per_source), self.hidden_size, dtype=self.dtype, device=self.device)  # [N, H]
        self._a2a(recv, recv[:0], per_source, zeros)
        slot_counts = counts.sum(0)  # [S]
        self.slot_load[layer] += slot_counts
        self.rows_served += int(slot_counts.sum())
        t1 = time.perf_counter()
        if echo:
            out = recv
        elif A > 1:
            # Rows arrive source by source, each sorted by slot; a stable sort by slot merges them
            # (keeping source order within a slot) into the grouping ExpertShard.forward expects.
            slot_of_row = torch.repeat_interleave(torch.arange(S).repeat(A), counts.reshape(-1))  # [N]
            perm = torch.argsort(slot_of_row, stable=True).to(self.device)  # [N]
            with self._compute_lock:
                computed = self.experts.forward(layer, recv.index_select(0, perm), slot_counts.tolist())
            out = torch.empty_like(recv).index_copy_(0, perm, computed)
        else:
            with self._compute_lock:
                out = self.experts.forward(layer, recv, slot_counts.tolist())  # [N, H]
        self.compute_seconds[layer] += time.perf_counter() - t1
        self._a2a(out[:0], out, zeros, per_source)
        self.layer_seconds[layer] += time.perf_counter() - t0
