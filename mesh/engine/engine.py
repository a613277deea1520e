"""The engine loop: add requests, step, stream deltas.

One step: schedule -> model forward (attention over paged KV, routed experts through the dispatcher)
-> sample -> postprocess (append tokens, detokenize, check stops, free finished sequences' blocks).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from mesh.cache.fingerprint import model_namespace
from mesh.engine.prefix_tiers import TieredPrefixCache
from mesh.cache.tier import PrefixTier
from mesh.config import ConfigError, EngineConfig, ModelConfig
from mesh.engine.block_manager import BlockManager
from mesh.engine.cuda_graphs import DecodeGraphs
from mesh.engine.model_runner import ModelRunner
from mesh.engine.process import keep_freed_memory
from mesh.engine.observe import EngineObserver
from mesh.engine.sampler import sample
from mesh.engine.scheduler import Scheduler
from mesh.engine.sequence import Sequence, Status
from mesh.engine.stats import EngineStats, PoolStats
from mesh.engine.state_cache import StateCache
from mesh.model.attention import KVCache
from mesh.model.backend import make_backend
from mesh.model.linear_attention import StatePool
from mesh.model.loader import load_model
from mesh.model.dispatch import Dispatcher, ExpertsLost
from mesh.parallel.local import LocalDispatcher
from mesh.tokenizer import IncrementalDetokenizer, Tokenizer
from mesh.types import (CompletionResult, FinishReason, InvalidRequest, Request, RequestOutput,
                        SamplingParams, TokenLogprob, Usage)

log = logging.getLogger("mesh.engine")


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None,
                 dispatcher: Dispatcher | None = None, prefix_tier: PrefixTier | None = None):
        """`dispatcher` None: all experts load here and run through the local dispatcher.
        `prefix_tier`: a remote prefix-cache tier (e.g. Redis) behind the local block pool."""
        self.config = config = config or EngineConfig()
        torch.manual_seed(config.seed)  # process-wide (mesh/engine/process.py)
        self.model_dir = Path(model_dir)
        self.model_config: ModelConfig = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        dtype = config.torch_dtype
        per_block = KVCache.bytes_per_block(mc.num_kv_layers, config.block_size, mc.num_kv_heads,
                                            mc.head_dim, dtype)
        kv_memory, self.num_state_snapshots = self._state_budget(mc, config)
        num_blocks = kv_memory // per_block
        if num_blocks < 2:
            raise ConfigError(
                f"--kv-cache-memory {config.kv_cache_memory} bytes holds {num_blocks} blocks of "
                f"{per_block} bytes; give it at least {2 * per_block} bytes")
        # A sequence must always fit in the pool by itself, else preemption could not make progress.
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings, num_blocks * config.block_size)
        try:
            self.backend = make_backend(config.backend, config.device, mc.rms_norm_eps, threads=config.cpu_threads,
                                        moe_kernel=config.moe_kernel)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model, experts = load_model(model_dir, dtype, config.device, with_experts=dispatcher is None,
                                         max_positions=self.max_model_len, backend=self.backend,
                                         load_format=config.load_format)
        self.dispatcher = dispatcher or LocalDispatcher(experts, mc.num_experts)
        states, self.state_cache = None, None
        if mc.num_linear_layers:
            # running slots, snapshot slots, and one scratch slot (the padding rows of a CUDA graph)
            states = StatePool(mc.num_linear_layers, config.max_num_seqs + self.num_state_snapshots + 1, mc.linear_conv_dim,
                               mc.linear_conv_kernel_dim, mc.linear_num_value_heads, mc.linear_key_head_dim,
                               mc.linear_value_head_dim, config.device)
            interval = config.state_snapshot_interval if config.enable_prefix_caching else 0
            self.state_cache = StateCache(config.max_num_seqs, self.num_state_snapshots, interval)
        self.kv = KVCache(mc.num_kv_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                          dtype, config.device, states=states)
        # Cached blocks are shared only within one model, dtype and block size (and salt).
        self.namespace = model_namespace(model_dir, mc.family, config.dtype, config.block_size)
        if config.prefix_namespace:
            self.namespace += ":" + config.prefix_namespace
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, self.namespace,
                                   states=self.state_cache)
        self.prefix_cache = TieredPrefixCache(prefix_tier, self.blocks, self.kv) if prefix_tier else None
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.prefix_cache.fetch if self.prefix_cache else None)
        # auto: two micro-batches only with remote experts on a GPU; on CPU the gateway and the workers
        # share cores, and the doubled round trips cost more than the overlap saves (bench/mesh_vs_local.py)
        remote_gpu = not isinstance(self.dispatcher, LocalDispatcher) and config.device.startswith("cuda")
        micro = config.micro_batches or (2 if remote_gpu else 1)
        graphs = None
        if (self.backend.name == "cuda" and torch.device(config.device).type == "cuda" and not config.enforce_eager
                and micro == 1 and self.dispatcher.graph_capturable):
            graphs = DecodeGraphs(self.model, self.kv, self.dispatcher, config.max_num_seqs, self.max_model_len)
            graphs.capture()
        if torch.device(config.device).type == "cpu":
            keep_freed_memory()  # process-wide: a CPU engine owns its process's allocator (mesh/engine/process.py)
        self.runner = ModelRunner(self.model, self.kv, self.dispatcher, micro_batches=micro, graphs=graphs,
                                  states=self.state_cache)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            self.eos_token_ids |= set(self.tokenizer.eos_token_ids)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}  # request id -> its first completion, until all its completions finish
        self._groups: dict[str, list[Sequence]] = {}  # request id -> its n completions, as long
        # A request's first completion -> its other n - 1, which start once its prompt is computed
        # (then they share its prompt's KV blocks instead of computing the prompt again).
        self._forks: dict[Sequence, list[Sequence]] = {}
        self._detok: dict[Sequence, IncrementalDetokenizer] = {}
        self._stop_text: dict[Sequence, tuple[str, str]] = {}  # completions with stop strings: (emitted tail, held)
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_lost_steps = 0  # steps voided by a lost expert worker (their sequences recomputed)
        self.observer = EngineObserver(self)

    @staticmethod
    def _state_budget(mc: ModelConfig, config: EngineConfig) -> tuple[int, int]:
        """How --kv-cache-memory is shared in a hybrid model: a recurrent-state slot per running
        sequence first, then, with prefix caching, half of the rest for state snapshots at block
        boundaries; the KV blocks get what remains. Returns (KV bytes, snapshot slots)."""
        if not mc.num_linear_layers:
            return config.kv_cache_memory, 0
        per_seq = mc.state_bytes_per_sequence
        running = (config.max_num_seqs + 1) * per_seq  # and a scratch slot
        if running * 2 > config.kv_cache_memory:
            raise ConfigError(
                f"--kv-cache-memory {config.kv_cache_memory} bytes: {config.max_num_seqs} running sequences "
                f"(--max-num-seqs) need {running} bytes of recurrent state ({per_seq} each) and that may "
                f"take at most half; raise --kv-cache-memory or lower --max-num-seqs")
        rest = config.kv_cache_memory - running
        snapshots = 0
        if config.enable_prefix_caching and config.state_snapshot_interval > 0:
            snapshots = rest // 2 // per_seq
        return rest - snapshots * per_seq, snapshots

    # ---- requests -------------------------------------------------------------------------
    def make_request(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                     sampling: SamplingParams | None = None, request_id: str | None = None,
                     **kw) -> Request:
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequest("give a prompt or prompt token ids")
            if self.tokenizer is None:
                raise InvalidRequest(
                    f"{self.model_dir} has no tokenizer.json: send prompt token ids instead of text")
            prompt_token_ids = self.tokenizer.encode(prompt)
        return Request(request_id or f"req-{next(self._ids)}", list(prompt_token_ids),
                       sampling or SamplingParams(), prompt=prompt, arrival_time=time.time(), **kw)

    def validate(self, req: Request) -> None:
        ids = req.prompt_token_ids
        if not ids:
            raise InvalidRequest("the prompt is empty: send at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for t in req.sampling.stop_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidRequest(f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this model serves at most {self.max_model_len} "
                f"tokens per sequence including at least one output token")
        if req.request_id in self._seqs:
            raise InvalidRequest(f"request id {req.request_id!r} is already in flight")
        resumed = req.resume_token_ids
        if resumed:
            bad = [t for t in resumed if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise InvalidRequest(f"resume_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
            if req.sampling.n != 1:
                raise InvalidRequest(f"resume_token_ids resume one completion; n is {req.sampling.n}")
            if len(resumed) >= req.sampling.max_tokens:
                raise InvalidRequest(f"resume_token_ids: {len(resumed)} tokens already reach max_tokens "
                                     f"({req.sampling.max_tokens}): nothing is left to generate")
            if len(ids) + len(resumed) >= self.max_model_len:
                raise InvalidRequest(f"the prompt ({len(ids)} tokens) and resume_token_ids ({len(resumed)}) fill "
                                     f"the {self.max_model_len}-token context: nothing is left to generate")

    def add_request(self, req: Request) -> None:
        self.validate(req)
        seqs = [Sequence(req, arrival=0, index=i) for i in range(req.sampling.n)]
        self._seqs[req.request_id] = seqs[0]
        self._groups[req.request_id] = seqs
        for seq in seqs:
            if self.tokenizer is not None:  # context only: resumed tokens' text was sent already
                self._detok[seq] = IncrementalDetokenizer(self.tokenizer, seq.token_ids)
            self.observer.on_add(seq)
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            self._forks[seqs[0]] = seqs[1:]
            for seq in seqs[1:]:
                seq.fork_parent = seqs[0]

    def _fork(self, first: Sequence, others: list[Sequence]) -> None:
        """`first` has computed its prompt: the other completions take its full prompt blocks by
        reference and compute only the rest (at least the last prompt token, whose logits they sample
        from), ahead of requests that arrived later."""
        shared = min((first.num_prompt_tokens - 1) // self.blocks.block_size, len(first.block_ids))
        for seq in reversed(others):
            seq.fork_parent = None
            self.blocks.fork(first, seq, shared)
            seq.num_cached_tokens = seq.cached_local = seq.num_computed_tokens
            seq.admitted = True  # its cached-token count is final, as after a first admission
            self.scheduler.add(seq, front=True)

    def abort(self, request_id: str) -> bool:
        """Free the request's blocks at once. False if it is unknown or already finished."""
        seqs = self._groups.get(request_id)
        if seqs is None:
            return False
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self._finish(seq, FinishReason.ABORT)
        return True

    def abort_all(self) -> int:
        """Abort every request in flight (benchmarks, shutdown); returns how many."""
        ids = list(self._seqs)
        for rid in ids:
            self.abort(rid)
        return len(ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def latency_percentile(self, kind: str, q: float, since_s: float) -> float:
        """The q-th percentile of "ttft" or "tpot" (seconds) over requests of the last `since_s` seconds
        (0.0 without any); safe from another thread (the expert pool's autoscaler asks)."""
        return self.observer.latencies.percentile(kind, q, since_s)[0]

    def stats(self, expert_load: bool = False) -> EngineStats:
        """A snapshot of the engine and its experts' pool. Safe to call from another thread while the
        engine steps (plain counters; figures may be one step apart). `expert_load` adds the per-expert
        routed rows (a copy from the device where the experts run in-process on a GPU)."""
        d, cfg = self.dispatcher, self.config
        return EngineStats(
            steps=self.num_steps, running=self.num_running, waiting=self.num_waiting,
            kv_blocks_used=self.blocks.num_used, kv_blocks_free=self.blocks.num_free,
            preemptions=self.scheduler.num_preemptions, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            pool=PoolStats(num_workers=d.num_workers, worker_threads=d.worker_threads,
                           expert_seconds=d.expert_seconds, expert_cpu_seconds=d.expert_cpu_seconds,
                           worker_compute_seconds=tuple(d.worker_compute_seconds),
                           expert_load=d.expert_load.clone() if expert_load else None))

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()  # this step's sequences and token counts
        if not batch.scheduled:
            return []
        for s in batch.scheduled:
            if s.seq.queue_span is not None:
                self.observer.on_admit(s.seq)
        span = self.observer.start_step(batch.scheduled)
        ctx = span.get_span_context()
        # only a sampled step's ids travel to expert workers: their spans are exported only under a kept parent
        sampled = ctx.is_valid and ctx.trace_flags.sampled
        self.dispatcher.set_step_trace(*((ctx.trace_id, ctx.span_id) if sampled else (0, 0)))
        try:
            samplers, logits = self.runner.run(batch.scheduled)
        except ExpertsLost as e:
            # The expert pool lost a member mid-step: nothing this step computed is kept. Its sequences
            # go back to the queue with every token they have and are recomputed (prefix-cache hits
            # where their blocks are full) on the re-formed pool, giving the tokens they would have.
            self.scheduler.requeue([s.seq for s in batch.scheduled])
            self.num_lost_steps += 1
            log.warning("step %d lost its experts; %d sequences requeued: %s", self.num_steps,
                        len(batch.scheduled), e)
            return []
        finally:
            self.observer.end_step(span, batch.scheduled)
        for s in batch.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            hashed = self.blocks.commit(s.seq)
            if hashed and self.prefix_cache is not None:
                self.prefix_cache.store(s.seq, hashed)
        tokens, logprobs = (sample(logits, [s.seq for s in samplers], self.generator, self.backend.argmax,
                                   self.eos_token_ids) if samplers else ([], None))
        for s in samplers:  # before postprocess, which frees the blocks of a completion that ends now
            others = self._forks.pop(s.seq, None)
            if others:
                self._fork(s.seq, others)
        self.num_steps += 1
        return [self._postprocess(s.seq, tok, logprobs[i] if logprobs is not None else None)
                for i, (s, tok) in enumerate(zip(samplers, tokens))]

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        sp = seq.sampling
        seq.token_ids.append(token)
        self.observer.on_token(seq)
        reason = None
        visible = True
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            reason, visible = FinishReason.STOP, False
        elif seq.num_output_tokens >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = FinishReason.LENGTH
        text = ""
        detok = self._detok.get(seq)
        if detok is not None:
            delta = detok.add((token,)) if visible else ""
            if reason is FinishReason.LENGTH:
                delta += detok.flush()  # release a character still split across tokens
            if sp.stop:
                text, stopped = self._hold_for_stop(seq, sp.stop, delta, final=reason is not None)
                if stopped:
                    reason = FinishReason.STOP
            else:
                text = delta
        usage = self._usage(seq)
        if reason is not None:
            self._finish(seq, reason)
        return RequestOutput(seq.request_id, [token], text, reason is not None, reason, usage, seq.index,
                             None if logprob is None else [logprob])

    def _hold_for_stop(self, seq: Sequence, stops: tuple[str, ...], delta: str, final: bool) -> tuple[str, bool]:
        """The text to emit now for a request with stop strings, given its newly decoded `delta`, and
        whether a stop string ended it. Text that may still become the start of a stop string (the
        last longest-1 characters) is held back until the next token or the end; a stop string is
        searched for from the last longest-1 characters already emitted (one may straddle the
        boundary). Only that tail and the held text are kept, not the whole output."""
        tail, held = self._stop_text.get(seq, ("", ""))
        buf, base = tail + held + delta, len(tail)
        cut = _find_stop(buf, stops, 0)
        if cut is not None:
            return buf[base:cut], True
        keep = max(map(len, stops)) - 1
        end = len(buf) if final else max(base, len(buf) - keep)
        self._stop_text[seq] = (buf[max(0, end - keep):end] if keep else "", buf[end:])
        return buf[base:end], False

    def _usage(self, seq: Sequence) -> Usage:
        """The prompt once, the tokens of all the request's completions, the first one's cached tokens."""
        seqs = self._groups.get(seq.request_id) or [seq]
        # a resumed request's earlier tokens were counted by the call that sent them
        return Usage(seq.num_prompt_tokens, sum(s.num_output_tokens - s.num_resumed for s in seqs),
                     seqs[0].num_cached_tokens)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is not Status.FINISHED:
            if seq.fork_parent is not None:  # never scheduled: waiting for its first completion's prompt
                seq.fork_parent = None
                seq.status = Status.FINISHED
            else:
                self.scheduler.remove(seq)
            self.observer.on_finish(seq, reason.value)
        seq.finish_reason = reason
        self._forks.pop(seq, None)
        self._detok.pop(seq, None)
        self._stop_text.pop(seq, None)
        seqs = self._groups.get(seq.request_id)
        if seqs is not None and all(s.status is Status.FINISHED for s in seqs):
            del self._groups[seq.request_id]
            del self._seqs[seq.request_id]

    def close(self) -> None:
        """Flush and stop background work (the prefix tier's writer)."""
        if self.prefix_cache is not None:
            self.prefix_cache.close()

    # ---- convenience ----------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[CompletionResult]:
        """Run requests to completion (a batch job); results in the order given, a request with n > 1
        giving its n completions one after another (index 0 to n - 1)."""
        for r in requests:
            self.add_request(r)
        acc: dict[tuple[str, int], CompletionResult] = {
            (r.request_id, i): CompletionResult(r.request_id, [], "", FinishReason.ABORT, Usage(), i,
                                                [] if r.sampling.logprobs is not None else None)
            for r in requests for i in range(r.sampling.n)}
        while self.has_unfinished():
            for out in self.step():
                res = acc[out.request_id, out.index]
                res.token_ids.extend(out.new_token_ids)
                res.text += out.new_text
                acc[out.request_id, 0].usage = out.usage
                if out.logprobs is not None and res.logprobs is not None:
                    res.logprobs.extend(out.logprobs)
                if out.finished:
                    res.finish_reason = out.finish_reason
        results = [acc[r.request_id, i] for r in requests for i in range(r.sampling.n)]
        for res in results:  # every completion's final usage is its request's
            res.usage = acc[res.request_id, 0].usage
        return results


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
