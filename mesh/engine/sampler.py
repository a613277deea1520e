"""Batched sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Sampling draws exponential noise and takes argmax(p / noise), which picks token i with probability
p_i. A seeded request draws its noise from its own generator, so its tokens do not depend on what
else is in the batch.
"""

from __future__ import annotations

import torch

from mesh.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None,
           argmax=None) -> list[int]:
    """logits [N, V] float32, one row per sequence -> next token ids. `argmax`: the backend's row
    argmax (the CPU's is a kernel), default torch's."""
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
        noise[r].exponential_(generator=g)
    pick = (probs / noise.to(dev)).argmax(dim=-1)  # [R] positions in sorted order
    out[idx] = order.gather(1, pick[:, None]).squeeze(1)
    return out.tolist()
