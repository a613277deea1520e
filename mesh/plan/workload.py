"""Workloads for load tests and the planner: token-length distributions, arrival processes and trace
files. Pure: the load generator (router_service.loadtest) turns these specs into gRPC requests, the
simulator (mesh.plan.simulate) into simulated ones.

Trace files are JSON Lines, one request per line, in arrival order:
    {"offset_s": 0.013, "prompt_tokens": 1900, "output_tokens": 48, "tenant": "acme",
     "prefix_id": "acme/repo-7", "prefix_tokens": 1536}
- offset_s       arrival time in seconds from the start of the trace (required when replayed as-is)
- prompt_tokens  prompt length; or `prompt`: the prompt text (then prompt_tokens, if given, is only
                 the planner's estimate of its length)
- output_tokens  tokens to generate (sent as max_tokens with ignore_eos, so the length is exact)
- tenant         optional; sent as the `x-tenant-id` metadata (tenants never share cached prefixes)
- prefix_id      optional; requests with the same id (and tenant) start with the same
                 `prefix_tokens` tokens, e.g. the same repository context in code completion
Unknown keys are ignored (traces exported from elsewhere may carry more).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

DIST_HELP = ("N (fixed), uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA or exponential:MEAN; "
             "every draw is rounded and at least 1")


@dataclass(frozen=True)
class Dist:
    """A token-length distribution: `Dist.parse("lognormal:512:0.6").sample(rng)`."""
    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int) -> "Dist":
        """Raises ValueError naming what is wrong (callers prefix the flag)."""
        s = str(text).strip()
        parts = s.split(":")
        kind, args = (parts[0].lower(), parts[1:]) if len(parts) > 1 else ("fixed", parts)
        need = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}
        if kind not in need:
            raise ValueError(f"unknown distribution {kind!r} in {s!r}: use {DIST_HELP}")
        if len(args) != need[kind]:
            raise ValueError(f"{kind} takes {need[kind]} number(s), got {s!r}: use {DIST_HELP}")
        try:
            nums = [float(x) for x in args]
        except ValueError:
            raise ValueError(f"{s!r} is not a length distribution: use {DIST_HELP}") from None
        a, b = nums[0], nums[1] if len(nums) > 1 else 0.0
        if kind == "fixed" and (a < 1 or a != int(a)):
            raise ValueError(f"a fixed length must be a whole number >= 1, got {s!r}")
        if kind == "uniform" and not 1 <= a <= b:
            raise ValueError(f"uniform:LO:HI needs 1 <= LO <= HI, got {s!r}")
        if kind in ("normal", "lognormal", "exponential") and (a <= 0 or b < 0):
            raise ValueError(f"{kind} needs a positive centre and a non-negative spread, got {s!r}")
        return cls(kind, a, b)

    def sample(self, rng: random.Random) -> int:
        k, a, b = self.kind, self.a, self.b
        if k == "fixed":
            x = a
        elif k == "uniform":
            x = rng.uniform(a, b)
        elif k == "normal":
            x = rng.gauss(a, b)
        elif k == "lognormal":
            x = a * math.exp(rng.gauss(0.0, b))
        else:
            x = rng.expovariate(1.0 / a)
        return max(1, int(round(x)))

    @property
    def mean(self) -> float:
        k, a, b = self.kind, self.a, self.b
        return {"fixed": a, "uniform": (a + b) / 2, "normal": a, "exponential": a,
                "lognormal": a * math.exp(b * b / 2)}[k]

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        nums = [self.a] if self.kind == "exponential" else [self.a, self.b]
        return ":".join([self.kind, *(f"{x:g}" for x in nums)])


@dataclass
class RequestSpec:
    """One request of a workload. `offset_s` is its arrival time in a trace (None: synthetic)."""
    prompt_tokens: int
    output_tokens: int
    offset_s: float | None = None
    prompt: str | None = None
    tenant: str = ""
    prefix_id: str = ""
    prefix_tokens: int = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "") and not (k == "prefix_tokens" and v == 0)}


def _trace_error(path, lineno: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {msg}")


def load_trace(path: str | Path) -> list[RequestSpec]:
    """Read a JSONL trace; raises ValueError naming the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    specs: list[RequestSpec] = []
    last = -math.inf
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise _trace_error(path, n, f"not JSON: {e.msg}") from None
        if not isinstance(d, dict):
            raise _trace_error(path, n, "each line must be a JSON object")
        prompt = d.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise _trace_error(path, n, "prompt must be non-empty text")
        pt = d.get("prompt_tokens")
        if pt is None:
            if prompt is None:
                raise _trace_error(path, n, "give prompt_tokens (a count) or prompt (text)")
            pt = max(1, round(len(prompt) / 3.5))  # the planner's estimate for text (code) prompts
        out = d.get("output_tokens")
        for name, v in (("prompt_tokens", pt), ("output_tokens", out)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _trace_error(path, n, f"{name} must be a whole number >= 1, got {v!r}")
        off = d.get("offset_s")
        if off is not None:
            if not isinstance(off, (int, float)) or isinstance(off, bool) or off < 0 or not math.isfinite(off):
                raise _trace_error(path, n, f"offset_s must be seconds >= 0, got {off!r}")
            if off < last:
                raise _trace_error(path, n, f"offset_s {off} is before the previous line's {last}: "
                                            "sort the trace by arrival")
            last = off
        ptok = d.get("prefix_tokens", 0)
        if not isinstance(ptok, int) or isinstance(ptok, bool) or not 0 <= ptok <= pt:
            raise _trace_error(path, n, f"prefix_tokens must be a whole number in [0, prompt_tokens], got {ptok!r}")
        specs.append(RequestSpec(pt, out, None if off is None else float(off), prompt,
                                 str(d.get("tenant") or ""), str(d.get("prefix_id") or ""), ptok))
    if not specs:
        raise ValueError(f"{path}: the trace has no requests")
    return specs


def write_trace(path: str | Path, specs: Iterable[RequestSpec]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in specs:
            f.write(json.dumps(s.as_dict()) + "\n")
    return path


def synthetic(prompt: Dist, output: Dist, seed: int = 0) -> Iterator[RequestSpec]:
    """Endless independent requests with lengths drawn from `prompt` and `output`."""
    rng = random.Random(seed)
    while True:
        yield RequestSpec(prompt.sample(rng), output.sample(rng))


def code_completion_trace(n: int, rate: float, *, repos: int = 8, prefix: Dist = Dist("fixed", 512),
                          suffix: Dist = Dist("uniform", 16, 128), output: Dist = Dist("uniform", 16, 64),
                          tenants: int = 2, seed: int = 0) -> list[RequestSpec]:
    """A synthetic code-completion trace: Poisson arrivals at `rate`; each request edits a file in
    one of `repos` repositories (Zipf-popular), so its prompt starts with that repository's shared
    context (`prefix` tokens) followed by a unique suffix."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(repos)]
    lengths = {i: prefix.sample(rng) for i in range(repos)}
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        r = rng.choices(range(repos), weights)[0]
        p = lengths[r]
        out.append(RequestSpec(p + suffix.sample(rng), output.sample(rng), round(t, 6),
                               tenant=f"tenant-{r % tenants}", prefix_id=f"repo-{r}", prefix_tokens=p))
    return out


def arrival_offsets(process: str, rate: float, duration: float, seed: int = 0) -> list[float]:
    """Arrival times in [0, duration) for `rate` requests/s: "poisson" (exponential gaps) or
    "constant" (evenly spaced, the first at 0)."""
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate}")
    if process == "constant":
        return [i / rate for i in range(math.ceil(duration * rate - 1e-9))]
    if process != "poisson":
        raise ValueError(f"arrival process must be poisson or constant, got {process!r}")
    rng = random.Random(seed)
    t, out = rng.expovariate(rate), []
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def cached_tokens(specs: Iterable[RequestSpec], block_size: int = 16) -> list[int]:
    """The prefix-cache hits to expect: a request whose (tenant, prefix_id) was seen before reuses the
    full blocks of its shared prefix (a cache that never evicts: an upper bound)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for s in specs:
        key = (s.tenant, s.prefix_id)
        hit = bool(s.prefix_id) and key in seen
        if s.prefix_id:
            seen.add(key)
        # the last prompt token is always computed (its logits give the first output token)
        out.append(min(s.prefix_tokens, s.prompt_tokens - 1) // block_size * block_size if hit else 0)
    return out
