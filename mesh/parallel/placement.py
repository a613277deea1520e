"""Where each expert lives: pure data and pure functions, no processes and no collectives.

Glossary (DeepSeek EPLB's terms):
- logical expert: the model's expert id `e` in [0, E), what the router's topk_ids name.
- physical expert / slot: one copy of a logical expert's weights held by one rank. The mesh has
  P = num_ranks * slots_per_rank physical slots per MoE layer; global slot `p` lives on rank
  `p // slots_per_rank` in that rank's local slot `p % slots_per_rank`.
- redundant expert: a physical copy beyond the first; P - E per layer. Hot experts get replicas so
  their rows spread over several ranks.

Tables, per MoE layer `l` (all int64, CPU):
- phy2log [L, P]: the logical expert held in each physical slot.
- log2phy [L, E, R]: the physical slots holding each logical expert, padded with -1, where R is the
  largest replica count of any expert.
- logcnt [L, E]: replicas per logical expert (>= 1: every expert must be placed at least once).

`rebalance(load, num_ranks, slots_per_rank)` is the EPLB-style pure function of observed load: the
same load gives the same placement on every process, so ranks can compute it independently.

`Placement.initial(L, E, W, redundant)` is what a pool starts with: the contiguous split when W divides
E (and the redundant slots split evenly), else any E on any W: every rank gets ceil((E + R) / W) slots
and the slots beyond E hold replicas (so 7 experts on 2 ranks is 4 + 4 slots, one expert replicated).
The wire protocol exchanges per-slot row counts as one [world, slots_per_rank] tensor, so ranks hold
equal slot counts; spare slots hold useful replicas instead of sitting empty.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch


def pick_replicas(log2phy: torch.Tensor, logcnt: torch.Tensor, topk_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """One layer's tables (log2phy [E, R], logcnt [E], on topk_ids' device) and topk_ids [T, K] ->
    physical slots [T, K]: token t takes replica (t + offset) % logcnt[e] of expert e
    (`Placement.choose_slots`; a dispatcher keeps the tables on its device and calls this per step)."""
    cnt = logcnt[topk_ids]  # [T, K]
    tok = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None] + offset  # [T, 1]
    return log2phy[topk_ids, tok % cnt]  # [T, K]


@dataclass(frozen=True, eq=False)
class Placement:
    phy2log: torch.Tensor  # [L, P] int64
    num_ranks: int
    slots_per_rank: int
    num_experts: int
    log2phy: torch.Tensor = field(init=False)  # [L, E, R] int64, -1 padded
    logcnt: torch.Tensor = field(init=False)  # [L, E] int64

    def __post_init__(self):
        p2l = torch.as_tensor(self.phy2log, dtype=torch.int64).cpu()
        if p2l.dim() != 2:
            raise ValueError(f"phy2log must be [num_layers, num_slots], got shape {tuple(p2l.shape)}")
        if self.num_ranks < 1 or self.slots_per_rank < 1:
            raise ValueError(f"need num_ranks >= 1 and slots_per_rank >= 1, got {self.num_ranks}, "
                             f"{self.slots_per_rank}")
        L, P = p2l.shape
        E = self.num_experts
        if P != self.num_ranks * self.slots_per_rank:
            raise ValueError(f"phy2log has {P} slots per layer, expected num_ranks * slots_per_rank = "
                             f"{self.num_ranks} * {self.slots_per_rank}")
        if P and (p2l.min() < 0 or p2l.max() >= E):
            raise ValueError(f"phy2log holds expert ids outside [0, {E})")
        logcnt = torch.stack([torch.bincount(row, minlength=E) for row in p2l]) if L else \
            torch.zeros(0, E, dtype=torch.int64)  # [L, E]
        if L and logcnt.min() < 1:
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(f"logical expert {expert} of MoE layer {layer} has no physical slot: every "
                             f"expert must be placed at least once")
        R = int(logcnt.max()) if L else 1
        log2phy = torch.full((L, E, R), -1, dtype=torch.int64)
        for l in range(L):
            # Slots of one expert in increasing slot order: a stable sort by logical id keeps them so.
            order = torch.argsort(p2l[l], stable=True)  # [P]
            rep = torch.arange(P) - torch.repeat_interleave(torch.cumsum(logcnt[l], 0) - logcnt[l], logcnt[l])
            log2phy[l, p2l[l][order], rep] = order
        object.__setattr__(self, "phy2log", p2l)
        object.__setattr__(self, "log2phy", log2phy)
        object.__setattr__(self, "logcnt", logcnt)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    def rank_of_slot(self, p: int) -> int:
        if not 0 <= p < self.num_slots:
            raise ValueError(f"slot {p} out of range [0, {self.num_slots})")
        return p // self.slots_per_rank

    def local_slots(self, rank: int) -> list[list[int]]:
        """Per MoE layer, the logical expert in each of `rank`'s local slots: load_experts' `slots`."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} out of range [0, {self.num_ranks})")
        s = self.slots_per_rank
        return self.phy2log[:, rank * s:(rank + 1) * s].tolist()

    def choose_slots(self, layer: int, topk_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """topk_ids [T, K] logical -> physical slots [T, K] on topk_ids' device.

        Token t takes replica (t + offset) % logcnt[e] of expert e: deterministic, and consecutive
        tokens alternate between replicas. Callers pass an `offset` that differs per gateway and per
        step so that single-token decode steps do not all land on replica 0. Every replica holds the
        same weights, so the choice changes where a row is computed, never its result.
        """
        dev = topk_ids.device
        return pick_replicas(self.log2phy[layer].to(dev), self.logcnt[layer].to(dev), topk_ids, offset)

    def rank_load(self, load: torch.Tensor) -> torch.Tensor:
        """load [L, E] rows per logical expert -> [L, num_ranks] expected rows per rank, counting an
        expert's rows as split evenly over its replicas (what choose_slots does on average)."""
        load = torch.as_tensor(load, dtype=torch.float64)
        per_slot = torch.gather(load / self.logcnt, 1, self.phy2log)  # [L, P]
        return per_slot.view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)

    def fingerprint(self) -> int:
        """A 31-bit checksum of the tables, for checking that every rank holds the same placement."""
        head = torch.tensor([self.num_ranks, self.slots_per_rank, self.num_experts], dtype=torch.int64)
        return zlib.crc32(head.numpy().tobytes() + self.phy2log.numpy().tobytes()) & 0x7FFFFFFF

    @classmethod
    def initial(cls, num_layers: int, num_experts: int, num_ranks: int, redundant: int = 0) -> Placement:
        """A start-up placement for any number of experts on any number of ranks.

        W divides E and R: `contiguous`. Otherwise ceil((E + R) / W) = S slots per rank, filled rank
        by rank with the experts 0, 1, ..., E-1, 0, 1, ... in turn: replica counts differ by at most
        one, and no rank holds an expert twice while S <= E. Load-driven placement is `rebalance`'s."""
        E, W = num_experts, num_ranks
        if W < 1 or E < 1:
            raise ValueError(f"need num_experts >= 1 and num_ranks >= 1, got {E}, {W}")
        if redundant < 0:
            raise ValueError(f"redundant experts must be >= 0, got {redundant}")
        if E % W == 0 and redundant % W == 0:
            return cls.contiguous(num_layers, E, W, redundant)
        S = -(-(E + redundant) // W)
        row = [i % E for i in range(W * S)]
        return cls(torch.tensor([row] * num_layers, dtype=torch.int64).view(num_layers, W * S), W, S, E)

    def with_slots(self, slots_per_rank: int, load: torch.Tensor | None = None) -> Placement:
        """This placement's ranks with `slots_per_rank` slots each (adding or removing redundant
        replicas), packed by `rebalance` over `load` [L, E] (default uniform)."""
        load = torch.ones(self.num_layers, self.num_experts) if load is None else load
        return rebalance(load, self.num_ranks, slots_per_rank)

    def describe(self) -> dict:
        """Plain data for APIs and logs: per layer, each rank's list of logical experts."""
        s = self.slots_per_rank
        return {"num_ranks": self.num_ranks, "slots_per_rank": s, "num_experts": self.num_experts,
                "layers": [[row[r * s:(r + 1) * s] for r in range(self.num_ranks)]
                           for row in self.phy2log.tolist()],
                "replicas": self.logcnt.tolist()}

    def moved_slots(self, new: Placement) -> list[list[int]]:
        """Per rank of `new`, how many (layer, slot) entries hold an expert that rank did not hold
        (in any slot of that layer) under this placement: the experts it must load to switch."""
        out = []
        for r in range(new.num_ranks):
            n = 0
            for l in range(new.num_layers):
                have = set(self.local_slots(r)[l]) if r < self.num_ranks else set()
                n += sum(1 for e in set(new.local_slots(r)[l]) if e not in have)
            out.append(n)
        return out

    def heal(self, lost: set[int] | list[int], load: torch.Tensor | None = None) -> Placement:
        """The placement after the ranks in `lost` are gone, moving as little as possible: every
        surviving rank keeps its slots as they are (renumbered 0..W'-1 in their old order); experts
        that lived only on lost ranks go to added slots (heaviest first, each to the least-loaded
        survivor with a free added slot); added slots left over hold replicas of the experts with the
        most load per replica. With a replica of every expert among the survivors, nothing is added
        and nothing needs loading. `load` [L, E] defaults to uniform."""
        lost = set(int(r) for r in lost)
        keep = [r for r in range(self.num_ranks) if r not in lost]
        if not keep:
            raise ValueError("every rank is lost: no placement is left to heal")
        if any(not 0 <= r < self.num_ranks for r in lost):
            raise ValueError(f"lost ranks {sorted(lost)} outside [0, {self.num_ranks})")
        E, S, W = self.num_experts, self.slots_per_rank, len(keep)
        load = torch.ones(self.num_layers, E, dtype=torch.float64) if load is None else \
            torch.as_tensor(load, dtype=torch.float64).cpu()
        held = [[self.local_slots(r)[l] for r in keep] for l in range(self.num_layers)]  # [L][W'][S]
        missing = [[e for e in range(E) if not any(e in h for h in held[l])] for l in range(self.num_layers)]
        extra = max((-(-len(m) // W) for m in missing), default=0)
        rows = []
        for l in range(self.num_layers):
            cnt = torch.bincount(torch.tensor([e for h in held[l] for e in h], dtype=torch.int64), minlength=E)
            ranks = [list(h) for h in held[l]]
            added = [[] for _ in range(W)]

            def rank_sum(r):
                return sum(float(load[l, e]) / max(1, int(cnt[e])) for e in ranks[r] + added[r])

            order = sorted(missing[l], key=lambda e: (-float(load[l, e]), e))
            for e in order:  # the lost experts first, so every expert is placed
                r = min((r for r in range(W) if len(added[r]) < extra), key=lambda r: (rank_sum(r), r))
                added[r].append(e)
                cnt[e] += 1
            for r in range(W):  # spare added slots: replicas of the hottest per replica, not already on r
                while len(added[r]) < extra:
                    mine = set(ranks[r] + added[r])
                    cand = [e for e in range(E) if e not in mine] or list(range(E))
                    e = max(cand, key=lambda e: (float(load[l, e]) / int(cnt[e]), -e))
                    added[r].append(e)
                    cnt[e] += 1
            rows.append([e for r in range(W) for e in ranks[r] + added[r]])
        return Placement(torch.tensor(rows, dtype=torch.int64).view(self.num_layers, W * (S + extra)), W,
                         S + extra, E)

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_ranks: int, redundant: int = 0) -> Placement:
        """Expert e on rank e // (E / W) in local slot e % (E / W), the same for every layer.

        `redundant` extra slots in total (a multiple of num_ranks) go after each rank's own experts
        and hold copies of the next rank's first experts, so a replica never sits beside its original
        while the ranks have enough experts. Load-driven replication is `rebalance`'s job.
        """
        E, W = num_experts, num_ranks
        if W < 1 or E < 1:
            raise ValueError(f"need num_experts >= 1 and num_ranks >= 1, got {E}, {W}")
        if E % W:
            raise ValueError(f"{E} experts do not split evenly over {W} ranks: the contiguous placement "
                             f"gives every rank E/W experts; pick num_ranks dividing {E} or use rebalance()")
        if redundant < 0 or redundant % W:
            raise ValueError(f"redundant={redundant} must be a non-negative multiple of num_ranks={W} so "
                             f"every rank has the same number of slots")
        per, extra = E // W, redundant // W
        row = []
        for r in range(W):
            row += list(range(r * per, (r + 1) * per))
            row += [((r + 1) * per + i) % E for i in range(extra)]
        return cls(torch.tensor([row] * num_layers, dtype=torch.int64).view(num_layers, -1), W, per + extra, E)


def rebalance(load: torch.Tensor, num_ranks: int, slots_per_rank: int) -> Placement:
    """Greedy balanced placement from load [L, E] (rows per logical expert, any non-negative numbers).

    Per layer: (1) replication: each of the P - E redundant slots goes to the expert whose load per
    replica is currently the highest; (2) packing (longest-processing-time first): replicas, heaviest
    first (load / replicas), go to the rank with the least load so far that still has a free slot;
    among equally loaded ranks one not yet holding that expert wins, then the lowest rank id. A replica
    may still share a rank with another copy when that balances best: the load model (rows split
    evenly over replicas, as choose_slots does) stays exact, the slot just adds no spread. The result
    is a deterministic function of the input; within a rank, slots are ordered by logical expert id.
    """
    load = torch.as_tensor(load, dtype=torch.float64).cpu()
    if load.dim() != 2:
        raise ValueError(f"load must be [num_layers, num_experts], got shape {tuple(load.shape)}")
    if (load < 0).any():
        raise ValueError("load must be non-negative")
    L, E = load.shape
    W, S = num_ranks, slots_per_rank
    if W < 1 or S < 1:
        raise ValueError(f"need num_ranks >= 1 and slots_per_rank >= 1, got {W}, {S}")
    if W * S < E:
        raise ValueError(f"{W} ranks x {S} slots = {W * S} slots cannot hold {E} experts")
    rows = []
    for l in range(L):
        cnt = torch.ones(E, dtype=torch.int64)
        for _ in range(W * S - E):
            cnt[int(torch.argmax(load[l] / cnt))] += 1  # argmax returns the first maximum
        replicas = torch.repeat_interleave(torch.arange(E), cnt)  # [P]
        weight = (load[l] / cnt)[replicas]  # [P]
        rank_sum = [0.0] * W
        held: list[list[int]] = [[] for _ in range(W)]
        for i in torch.argsort(-weight, stable=True).tolist():
            e = int(replicas[i])
            free = [r for r in range(W) if len(held[r]) < S]
            r = min(free, key=lambda r: (rank_sum[r], e in held[r], r))
            held[r].append(e)
            rank_sum[r] += float(weight[i])
        rows.append([e for r in range(W) for e in sorted(held[r])])
    return Placement(torch.tensor(rows, dtype=torch.int64).view(L, W * S), W, S, E)
