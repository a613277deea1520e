"""`mesh generate --target HOST:PORT`: the in-process `mesh generate`, against a running `mesh serve`.

Same sampling flags, same output: streamed text (token ids when the model has no tokenizer) then a
newline, or with --json one object per completion {"request_id", "index", "token_ids", "text",
"finish_reason", "usage"} (and "logprobs"); a timing line on stderr. gRPC errors print
`mesh: error: <CODE>: <details>` and exit 1. Engine flags are refused before this runs (mesh_cli).
"""

from __future__ import annotations

import json
import sys
import time

from mesh.cli import client_security, sampling_kwargs
from router_service.client import MeshClient, MeshError


def generate_remote(args) -> int:
    # Checked here for what the proto cannot even carry (a negative seed or max_tokens), with the
    # message the in-process form prints; the server validates everything again.
    sampling = sampling_kwargs(args)
    timeout = getattr(args, "timeout", None)
    security = client_security(args)
    try:
        client = MeshClient(args.target, timeout=timeout, **security)
    except ValueError as e:  # router_service.tls.TlsError names the flag
        print(f"mesh: error: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            t0 = time.perf_counter()
            kw = dict(prompt=args.prompt, prompt_token_ids=args.prompt_ids, **sampling)
            if args.json or sampling["n"] > 1:
                result = client.complete(**kw)
                choices = result.pop("completions", None) or [{"index": 0, **{k: result[k] for k in result
                                                                              if k not in ("request_id", "usage")}}]
                for c in choices:
                    if args.json:
                        print(json.dumps({"request_id": result["request_id"], **c, "usage": result["usage"]}))
                    else:
                        print(f"--- completion {c['index']} ({c['finish_reason']})")
                        print(c["text"] or " ".join(map(str, c["token_ids"])))
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
