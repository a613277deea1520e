"""Batched sampling: penalties, greedy, temperature, top-k, top-p, per-request seeds, log probabilities.

One step's logits [N, V] go through, in this order and only for the rows that ask:
  1. repetition penalty over the prompt's and the output's tokens, then frequency and presence
     penalties over the output's (vLLM's order), then the min_tokens mask on end-of-sequence and stop
     ids; all as tensor ops on the logits' device, the token counts scattered from each sequence's ids.
  2. the pick: argmax for greedy rows; otherwise temperature, top-k and top-p, then a draw.
  3. log probabilities: the log-softmax of the logits after step 1 (before temperature, top-k and
     top-p), gathered at the chosen token, with the top `logprobs` alternatives.
A batch where no row asks for 1 or 3 does exactly the plain argmax / draw and nothing else.

A draw uses exponential noise and takes argmax(p / noise), which picks token i with probability p_i.
A seeded request draws its noise from its own generator, so its tokens do not depend on what else is
in the batch.
"""

from __future__ import annotations

import array

import torch

from mesh.engine.sequence import Sequence
from mesh.types import TokenLogprob


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None,
           argmax=None, eos_token_ids=()) -> tuple[list[int], list[TokenLogprob | None] | None]:
    """logits [N, V] float32, one row per sequence -> (next token ids, per-row log probabilities or
    None where no row asked). `argmax`: the backend's row argmax (the CPU's is a kernel), default
    torch's. `eos_token_ids`: what min_tokens keeps from being sampled, besides each row's stop ids."""
    if any(s.sampling.penalised for s in seqs):
        logits = apply_penalties(logits, seqs, eos_token_ids)
    tokens = _pick(logits, seqs, generator, argmax)
    if all(s.sampling.logprobs is None for s in seqs):
        return tokens, None
    return tokens, _logprobs(logits, seqs, tokens)


def _pick(logits: torch.Tensor, seqs: list[Sequence], generator, argmax) -> list[int]:
    n = logits.shape[0]
    greedy = [s.sampling.greedy for s in seqs]
    out = argmax(logits) if argmax is not None else logits.argmax(dim=-1)
    if all(greedy):
        return out.tolist()
    rows = [i for i in range(n) if not greedy[i]]
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    x = logits[idx]  # [R, V]
    temp = torch.tensor([seqs[i].sampling.temperature for i in rows], dtype=torch.float32, device=dev)
    x = x / temp[:, None]
    top_k = torch.tensor([seqs[i].sampling.top_k if seqs[i].sampling.top_k > 0 else x.shape[1]
                          for i in rows], device=dev)
    top_p = torch.tensor([seqs[i].sampling.top_p for i in rows], dtype=torch.float32, device=dev)
    sorted_x, order = x.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(x.shape[1], device=dev)[None, :]
    sorted_x = sorted_x.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    # drop tokens once the mass before them already reaches top_p (the first always stays)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    # Noise comes from CPU generators on every device, so a seeded request samples the same tokens
    # on the CPU and on a GPU (given the same logits).
    noise = torch.empty(probs.shape, dtype=probs.dtype)
    for r, i in enumerate(rows):
        g = seqs[i].generator or generator
        if seqs[i].skip_draws:  # a resumed seeded request: the draws its earlier tokens took elsewhere
            for _ in range(seqs[i].skip_draws):
                torch.empty_like(noise[r]).exponential_(generator=g)
            seqs[i].skip_draws = 0
        noise[r].exponential_(generator=g)
    pick = (probs / noise.to(dev)).argmax(dim=-1)  # [R] positions in sorted order
    out[idx] = order.gather(1, pick[:, None]).squeeze(1)
    return out.tolist()


def token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each row's ids (one scatter on the device)."""
    width = max((len(ids) for ids in id_lists), default=0)
    flat = array.array("q")
    for ids in id_lists:
        flat.extend(ids)
        flat.extend([vocab] * (width - len(ids)))  # padding lands in a column dropped below
    counts = torch.zeros(len(id_lists), vocab + 1, dtype=torch.float32, device=device)
    if width:
        index = torch.frombuffer(flat, dtype=torch.long).view(len(id_lists), width).to(device)
        counts.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids=()) -> torch.Tensor:
    """A copy of `logits` [N, V] with each penalised row's penalties and min_tokens mask applied."""
    rows = [i for i, s in enumerate(seqs) if s.sampling.penalised]
    dev, vocab = logits.device, logits.shape[1]
    out = logits.clone()
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    x = out[idx]  # [R, V]
    sps = [seqs[i].sampling for i in rows]

    def column(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev)[:, None]  # [R, 1]

    if any(sp.repetition_penalty != 1 for sp in sps):
        seen = token_counts([seqs[i].token_ids for i in rows], vocab, dev) > 0  # prompt and output
        rep = column([sp.repetition_penalty for sp in sps])
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    if any(sp.frequency_penalty != 0 or sp.presence_penalty != 0 for sp in sps):
        counts = token_counts([seqs[i].output_token_ids for i in rows], vocab, dev)
        x = x - column([sp.frequency_penalty for sp in sps]) * counts \
            - column([sp.presence_penalty for sp in sps]) * (counts > 0)
    banned = [(r, t) for r, i in enumerate(rows) if seqs[i].num_output_tokens < sps[r].min_tokens
              for t in {*sps[r].stop_token_ids, *(() if sps[r].ignore_eos else eos_token_ids)} if 0 <= t < vocab]
    if banned:
        r_idx, t_idx = zip(*banned)
        x[torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)] = float("-inf")
    out[idx] = x
    return out


def _logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
    dev = logits.device
    lp = torch.log_softmax(logits[torch.tensor(rows, device=dev)], dim=-1)  # [R, V]
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=dev)[:, None]).squeeze(1).tolist()
    k = max(seqs[i].sampling.logprobs for i in rows)
    top_v, top_i = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    out: list[TokenLogprob | None] = [None] * len(seqs)
    for r, i in enumerate(rows):
        want = seqs[i].sampling.logprobs
        out[i] = TokenLogprob(tokens[i], chosen[r], list(zip(top_i[r][:want], top_v[r][:want])))
    return out
