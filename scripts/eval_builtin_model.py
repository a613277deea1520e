"""Does the built-in model write Python? Greedy completions of function headers from held-out files
(never trained on), cut where the function ends, checked with `ast.parse`.

    python scripts/eval_builtin_model.py                    # the built-in model, 50 headers
    python scripts/eval_builtin_model.py --model DIR --samples 100 --show 5

Headers: single-line top-level `def` lines (`def name(args):` or with a return annotation) of the
held-out files of scripts/train_builtin_model.py (the same content-hash split), 50 drawn with a fixed
seed. Each prompt is the header alone, as `mesh generate --prompt "def fibonacci(n):"` sends it: no
trailing newline, since the tokenizer merges a newline with the next line's indentation, and a prompt
ending in a bare newline token would tell the model that the next line starts in column 0. The
completion (greedy, at most --max-tokens tokens) is cut at its first non-blank line after the header's
that starts in column 0 (the function has ended); a completion that never gets there loses its last,
possibly unfinished, line. The header plus the cut completion must parse. Prints the parse rate and
one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import train_builtin_model as corpus  # noqa: E402  (the training script's corpus and split)

HEADER = re.compile(r"^def [A-Za-z_]\w*\(.*\)(\s*->\s*[^:]+)?:\s*$")


def headers(texts: list[str]) -> list[str]:
    """Every single-line top-level function header of these files, in file order."""
    out = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= len(lines):
                line = lines[node.lineno - 1].rstrip()
                if HEADER.match(line) and len(line) <= 100:
                    out.append(line)
    return out


def cut(header: str, completion: str, finished_early: bool) -> str:
    """The header's line and the function body: lines up to the first later one in column 0."""
    first, *rest = (header + completion).split("\n")
    body = []
    for line in rest:
        if line.strip() and not line[0].isspace():
            return "\n".join([first, *body])
        body.append(line)
    if not finished_early:
        body = body[:-1]  # cut off by max_tokens: the last line may be unfinished
    return "\n".join([first, *body])


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Parse rate of the built-in model's greedy completions of held-out "
                                            "function headers.")
    p.add_argument("--model", default=None, help="model directory (default: the built-in model)")
    p.add_argument("--samples", type=int, default=50, help="function headers to complete (default 50)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per completion (default 128)")
    p.add_argument("--seed", type=int, default=0, help="which headers are drawn (default 0)")
    p.add_argument("--show", type=int, default=0, help="print this many completions in full")
    args = p.parse_args(argv)

    from router_service.hub import resolve_model
    from mesh.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.types import FinishReason, SamplingParams

    t0 = time.time()
    _, held, _ = corpus.load_corpus(0)
    candidates = sorted(set(headers(held)))
    picked = random.Random(args.seed).sample(candidates, min(args.samples, len(candidates)))
    model = resolve_model(args.model)
    engine = Engine(model, EngineConfig(dtype="float32", kv_cache_memory=256 << 20))
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    results = engine.generate([engine.make_request(prompt=h, sampling=greedy) for h in picked])
    ok = 0
    for i, (h, r) in enumerate(zip(picked, results)):
        code = cut(h, r.text, r.finish_reason is FinishReason.STOP)
        good = parses(code)
        ok += good
        if i < args.show:
            print(f"--- {'ok' if good else 'FAILS'}\n{code}\n")
    rate = ok / len(picked)
    print(f"{ok}/{len(picked)} completions parse ({rate:.0%}); {len(held)} held-out files, {len(candidates)} "
          f"headers; model {model}; {time.time() - t0:.0f}s")
    print(json.dumps({"parse_rate": round(rate, 3), "parsed": ok, "samples": len(picked),
                      "max_tokens": args.max_tokens, "model": str(model)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
