"""Turns a scheduled batch into model inputs, runs the forward pass, returns the logits to sample."""

from __future__ import annotations

import array

import torch

from mesh.engine.cuda_graphs import DecodeGraphs
from mesh.engine.scheduler import ScheduledSeq
from mesh.engine.state_cache import StateCache
from mesh.model.attention import AttentionMetadata, KVCache, PrefillChunk
from mesh.model.decoder import MicroBatch, MoEDecoder
from mesh.model.dispatch import Dispatcher


class ModelRunner:
    def __init__(self, model: MoEDecoder, kv: KVCache, dispatcher: Dispatcher, micro_batches: int = 1,
                 graphs: DecodeGraphs | None = None, states: StateCache | None = None):
        """`graphs`: captured decode steps (CUDA); pure-decode steps they fit replay them. `states`: a
        hybrid model's recurrent-state slots (the pool itself is `kv.states`)."""
        self.states = states
        self._after_step: list[tuple[int, int]] = []  # state copies (slot -> snapshot slot) once a step ran
        self.model = model
        self.micro_batches = micro_batches
        self.kv = kv
        self.dispatcher = dispatcher
        self.block_size = kv.block_size
        self.device = model.device
        self.graphs = graphs
        self.graph_steps = 0  # steps served by a graph replay

    def run(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Returns the sequences that sample this step and their logits [N, V] float32, in that order.

        With `micro_batches == 2` (the mesh) and at least two sequences, the batch is cut in two halves
        of about equal tokens that overlap each other's expert round trips.
        """
        self._after_step = []
        if self.graphs is not None and all(s.num_tokens == 1 for s in batch) \
                and self.graphs.size_for(len(batch)) is not None:
            return self._run_graph(batch)
        if self.micro_batches == 2 and len(batch) >= 2:
            halves = _split(batch)
            prepared = [self._prepare(part) for part in halves]
            hidden = self.model.forward_micro_batches([MicroBatch(*p[:3]) for p in prepared], self.kv,
                                                      self.dispatcher)
            samplers = [s for p in prepared for s in p[3]]
            rows = [h.index_select(0, torch.tensor(p[4], dtype=torch.long, device=self.device))
                    for h, p in zip(hidden, prepared)]
            selected = torch.cat(rows)
        else:
            ids, pos, meta, samplers, sample_rows = self._prepare(batch)
            hidden = self.model.forward(ids, pos, meta, self.kv, self.dispatcher)
            if len(sample_rows) == hidden.shape[0]:  # every row samples (a decode-only step): rows in order
                selected = hidden
            else:
                selected = hidden.index_select(0, torch.tensor(sample_rows, dtype=torch.long, device=self.device))
        self._take_snapshots()
        if not samplers:
            return [], selected.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        return samplers, self.model.logits(selected)

    def _run_graph(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """A pure-decode step through the captured graph of its (padded) batch size."""
        bs = self.block_size
        ids, pos, slots, lens, tables = [], [], [], [], []
        for s in batch:
            seq, c = s.seq, s.seq.num_computed_tokens
            ids.append(seq.token_ids[c])
            pos.append(c)
            slots.append(seq.block_ids[c // bs] * bs + c % bs)
            lens.append(c + 1)
            tables.append(seq.block_ids[:c // bs + 1])
        state_slots = None
        if self.states is not None:  # hybrid: initialise new slots, ask for snapshots
            meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=len(batch))
            self._state_metadata(meta, batch, [], device_slots=False)
            state_slots = meta.state_slots
        logits = self.graphs.run(ids, pos, slots, lens, tables, state_slots)
        self.graph_steps += 1
        self._take_snapshots()
        samplers = [s for s in batch if s.samples]
        if len(samplers) != len(batch):
            rows = [i for i, s in enumerate(batch) if s.samples]
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.device))
        return samplers, logits

    def _prepare(self, batch: list[ScheduledSeq]):
        """(input_ids [T], positions [T], metadata, samplers, their rows) for one forward pass.

        Rows are laid out single-token chunks first (batched decode attention), then prefill chunks.
        """
        bs = self.block_size
        decodes = [s for s in batch if s.num_tokens == 1]
        prefills = [s for s in batch if s.num_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for s in decodes:
            seq, c = s.seq, s.seq.num_computed_tokens
            ids.append(seq.token_ids[c])
            pos.append(c)
            slots.append(seq.block_ids[c // bs] * bs + c % bs)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=len(decodes))
        if decodes:
            ctx = [s.seq.num_computed_tokens + 1 for s in decodes]
            width = -(-max(ctx) // bs)
            table: list[int] = []
            for s in decodes:
                row = s.seq.block_ids[:width]
                table += row
                if len(row) < width:
                    table += [0] * (width - len(row))
            meta.decode_block_table = _longs(table, self.device).view(len(decodes), width)  # [B, M]
            meta.decode_context_lens = _longs(ctx, self.device)
        row = len(decodes)
        sample_rows = [i for i, s in enumerate(decodes) if s.samples]
        samplers = [s for s in decodes if s.samples]
        prefill_slots = []
        for s in prefills:
            seq, c, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            ids.extend(seq.token_ids[c:c + n])
            p = torch.arange(c, c + n)
            pos.extend(range(c, c + n))
            nblocks = -(-(c + n) // bs)
            blocks = torch.tensor(seq.block_ids[:nblocks], dtype=torch.long)
            prefill_slots.append(blocks[p // bs] * bs + p % bs)
            meta.prefills.append(PrefillChunk(row, n, c + n, _to_device(blocks, self.device)))
            row += n
            if s.samples:
                sample_rows.append(row - 1)
                samplers.append(s)
        decode_slots = _longs(slots, torch.device("cpu"))
        meta.slot_mapping = _to_device(torch.cat([decode_slots] + prefill_slots) if prefill_slots else decode_slots,
                                       self.device)
        if self.states is not None:
            self._state_metadata(meta, decodes, prefills)
        input_ids = _longs(ids, self.device)
        positions = _longs(pos, self.device)
        return input_ids, positions, meta, samplers, sample_rows

    def _take_snapshots(self) -> None:
        """Decode rows that completed a block: their state after the step, into its snapshot slot."""
        for slot, snapshot in self._after_step:
            self.kv.states.copy(slot, snapshot)
        self._after_step = []

    def _state_metadata(self, meta: AttentionMetadata, decodes: list[ScheduledSeq],
                        prefills: list[ScheduledSeq], device_slots: bool = True) -> None:
        """Hybrid models: initialise newly admitted sequences' state slots (zeros, or a cached prefix's
        snapshot), give each row its slot, and ask for a snapshot wherever this step completes a block
        the prefix cache keeps one for."""
        cache, pool, bs = self.states, self.kv.states, self.block_size
        rows = decodes + prefills
        for s in rows:
            seq = s.seq
            if seq.state_init is not None:
                if seq.state_init < 0:
                    pool.reset(seq.state_slot)
                else:
                    pool.copy(seq.state_init, seq.state_slot)
                seq.state_init = None
        meta.state_slots = [s.seq.state_slot for s in rows]
        if device_slots:
            meta.decode_state_slots = _longs(meta.state_slots[:len(decodes)], self.device)
        for r, s in enumerate(rows):
            seq, c = s.seq, s.seq.num_computed_tokens
            asked = []
            if cache.interval and seq.request.use_prefix_cache:
                for p in range((c // bs + 1) * bs, c + s.num_tokens + 1, bs):  # block ends inside the chunk
                    j = p // bs - 1
                    if j >= len(seq.block_hashes) and j not in seq.pending_snapshots and cache.wants_snapshot(j):
                        slot = cache.take_snapshot_slot()
                        if slot is None:
                            break
                        seq.pending_snapshots[j] = slot
                        asked.append((p - c, slot))
            if r < len(decodes):  # a decode row's state after its token is its slot's after the step
                self._after_step += [(seq.state_slot, slot) for _, slot in asked]
            else:
                meta.snapshots.append(asked)


def _longs(values: list[int], device: torch.device) -> torch.Tensor:
    """A list of ints as an int64 tensor, through an `array` (a third of torch.tensor's time on a list
    of a few hundred ints; the tensor keeps the array alive)."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    return _to_device(torch.frombuffer(array.array("q", values), dtype=torch.long), device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, since a copy from pageable memory
    makes the host wait for the stream."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _split(batch: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
    """Two non-empty halves with about equal tokens, keeping the scheduler's order."""
    total = sum(s.num_tokens for s in batch)
    acc, cut = 0, 1
    for i, s in enumerate(batch[:-1]):
        acc += s.num_tokens
        cut = i + 1
        if acc * 2 >= total:
            break
    return [batch[:cut], batch[cut:]]
