"""`mesh generate --target HOST:PORT`: the in-process `mesh generate`, against a running `mesh serve`.

Same flags, same output: streamed text (token ids when the model has no tokenizer) then a newline,
or with --json one object {"request_id", "token_ids", "text", "finish_reason", "usage"}; a timing
line on stderr. gRPC errors print `mesh: error: <CODE>: <details>` and exit 1.
"""

from __future__ import annotations

import json
import sys
import time

from mesh.types import InvalidRequest, SamplingParams
from router_service.client import MeshClient, MeshError


def _sampling(args) -> dict:
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, stop=tuple(args.stop or ()), ignore_eos=bool(args.ignore_eos))
    # Check here what the proto cannot even carry (a negative seed or max_tokens), with the same
    # message the in-process form prints; the server validates everything again.
    SamplingParams(**kw)
    return kw


def generate_remote(args) -> int:
    try:
        sampling = _sampling(args)
    except InvalidRequest as e:
        print(f"mesh: error: {e}", file=sys.stderr)
        return 1
    timeout = getattr(args, "timeout", None)
    with MeshClient(args.target, timeout=timeout) as client:
        try:
            t0 = time.perf_counter()
            kw = dict(prompt=args.prompt, prompt_token_ids=args.prompt_ids, **sampling)
            if args.json:
                print(json.dumps(client.complete(**kw)))
                info = None
            else:
                info = client.model_info()
                for delta in client.generate(**kw):
                    text = delta.new_text if info["has_tokenizer"] else "".join(f"{t} " for t in delta.new_token_ids)
                    sys.stdout.write(text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            info = info or client.model_info()
        except MeshError as e:
            print(f"mesh: error: {e.code.name}: {e.details}", file=sys.stderr)
            return 1
    print(f"[{info['family']}, {info['dtype']}, {args.target}] {time.perf_counter() - t0:.2f}s",
          file=sys.stderr)
    return 0
