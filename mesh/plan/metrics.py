"""Request-level serving metrics, shared by the load test's report and the simulator's predictions
(the same arithmetic on both sides, so predicted and measured figures compare like for like).

A record is a dict with times in seconds from the start of the run:
    sent_s, first_token_s (None if no token came), end_s (last response or the error),
    prompt_tokens, cached_tokens, output_tokens, itl_ms (gaps between token-carrying responses),
    code ("OK" or the gRPC status name).
Definitions:
- ttft: first_token_s - sent_s; e2e: end_s - sent_s; tpot: (end_s - first_token_s) / (output - 1)
  for completed requests with at least 2 output tokens; itl: every gap, pooled over requests.
- the window is first send to last end; throughputs are totals over the window (the drain at the
  end included, as a client sees it).
- goodput_rps: completed requests meeting every SLO given (ttft <= slo_ttft_ms, tpot <= slo_tpot_ms),
  per second of the window.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

PCTS = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: Sequence[float]) -> dict:
    """{"mean", "p50", "p90", "p99", "count"} of `values` (None entries when empty)."""
    out = {"mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in PCTS})
    out["count"] = len(values)
    return out


def ok(r: dict) -> bool:
    return r.get("code", "OK") == "OK"


def tpot_ms(r: dict) -> float | None:
    n, first = r.get("output_tokens", 0), r.get("first_token_s")
    if not ok(r) or first is None or n < 2:
        return None
    return (r["end_s"] - first) * 1000.0 / (n - 1)


def ttft_ms(r: dict) -> float | None:
    first = r.get("first_token_s")
    return None if first is None else (first - r["sent_s"]) * 1000.0


def meets_slo(r: dict, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not ok(r):
        return False
    t = ttft_ms(r)
    if slo_ttft_ms is not None and (t is None or t > slo_ttft_ms):
        return False
    p = tpot_ms(r)
    return not (slo_tpot_ms is not None and p is not None and p > slo_tpot_ms)


def summarize(records: Iterable[dict], slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict:
    recs = [r for r in records if r.get("sent_s") is not None]
    done = [r for r in recs if ok(r)]
    start = min((r["sent_s"] for r in recs), default=0.0)
    end = max((r["end_s"] for r in recs if r.get("end_s") is not None), default=start)
    window = max(end - start, 0.0)
    per_s = (lambda x: x / window) if window > 0 else (lambda x: 0.0)
    out_tok = sum(r["output_tokens"] for r in done)
    in_tok = sum(r["prompt_tokens"] for r in done)
    cached = sum(r.get("cached_tokens", 0) for r in done)
    ttft = [t for t in map(ttft_ms, done) if t is not None]
    tpot = [t for t in map(tpot_ms, done) if t is not None]
    itl = [g for r in done for g in r.get("itl_ms") or ()]
    e2e = [(r["end_s"] - r["sent_s"]) * 1000.0 for r in done]
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in done)
    errors = Counter(r.get("code", "OK") for r in recs if not ok(r))
    return {
        "requests": {"sent": len(recs), "completed": len(done), "failed": len(recs) - len(done)},
        "window_s": window,
        "ttft_ms": dist(ttft), "tpot_ms": dist(tpot), "itl_ms": dist(itl), "e2e_ms": dist(e2e),
        "throughput_rps": per_s(len(done)),
        "output_tokens_per_s": per_s(out_tok),
        "input_tokens_per_s": per_s(in_tok),
        "goodput_rps": per_s(good),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms,
                "attainment": good / len(done) if done else None},
        "cached_token_share": cached / in_tok if in_tok else 0.0,
        "tokens": {"prompt": in_tok, "cached": cached, "output": out_tok},
        "errors": dict(sorted(errors.items())),
    }
