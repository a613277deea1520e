"""The `mesh` command (console script; also `python -m mesh_cli`): init-model, generate, serve, loadtest,
plan.

This package composes the core and the edge: the core's flags, engine configuration and init-model
(mesh.cli), the gateway's `serve` and remote client (router_service), the load generator and capacity
planner commands (router_service.loadtest). It is the one place that imports both sides, so mesh/ never
imports the edge. Building the parser loads none of the edge's libraries (grpc, ray, redis, HTTP): each
command imports them when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mesh.cli import (DEFAULT_ARCH, DEFAULT_PRESET, add_client_security_flags, add_engine_flags,
                      add_sampling_flags, cmd_init_model, engine_config, int_list, progress, reject_engine_flags,
                      sampling_params)
from mesh.presets import ARCHS, PRESETS
from mesh.kuberay import register as deploy_register
from router_service.admin_cli import register as admin_register
from router_service.cli import register as serve_register
from router_service.hub import resolve_model
from router_service.loadtest.cli import register as loadtest_register


def cmd_generate(args) -> int:
    if args.target:
        reject_engine_flags(args)
        from router_service.client_cli import generate_remote  # grpc loads here
        return generate_remote(args)
    given = [f for f, v in (("--tls", args.tls), ("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                            ("--tls-key", args.tls_key), ("--tls-server-name", args.tls_server_name),
                            ("--token-file", args.token_file)) if v]
    if given:
        raise SystemExit(f"mesh: error: {', '.join(given)}: connection flags need --target HOST:PORT")
    from mesh.engine.engine import Engine
    from mesh.types import InvalidRequest
    params = sampling_params(args)
    model = resolve_model(args.model, args.load_format, args.revision)
    engine = Engine(model, engine_config(args))
    try:
        req = engine.make_request(prompt=args.prompt, prompt_token_ids=args.prompt_ids, sampling=params)
        t0 = time.perf_counter()
        if args.json or params.n > 1:
            for result in engine.generate([req]):
                if args.json:
                    print(json.dumps(result.as_dict()))
                else:
                    print(f"--- completion {result.index} ({result.finish_reason.value})")
                    print(result.text if engine.tokenizer else " ".join(map(str, result.token_ids)))
        else:
            engine.add_request(req)
            while engine.has_unfinished():
                for out in engine.step():
                    text = out.new_text if engine.tokenizer else " ".join(map(str, out.new_token_ids)) + " "
                    sys.stdout.write(text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
        progress(f"[{engine.model_config.family}, {args.dtype}] {time.perf_counter() - t0:.2f}s")
    except InvalidRequest as e:
        raise SystemExit(f"mesh: error: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="moe-mesh: serve Mixture-of-Experts code models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-model", help="write a random-weight checkpoint and tokenizer in HF format",
                       description="Write a random-weight Hugging Face checkpoint (config.json, safetensors, "
                                   "a byte-level BPE tokenizer.json trained on local Python source).")
    p.add_argument("--arch", choices=sorted(ARCHS), default=DEFAULT_ARCH,
                   help="architecture family: qwen3_moe (Qwen3-Coder), qwen3_next (the hybrid Qwen3-Coder-Next), "
                        "qwen2_moe, mixtral (default qwen3_moe)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="model size: tiny (tests), small (demos), bench (~64M params), "
                        "coder-30b-a3b, coder-480b-a35b (--arch qwen3_moe) and coder-next (--arch qwen3_next): "
                        "the Qwen3-Coder models' real shapes, with --config-only")
    p.add_argument("--config-only", action="store_true",
                   help="write config.json and the tokenizer but no weights (serve them with --load-format dummy)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype on disk")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", help="generate from one prompt, in-process or against a server",
                       description="Generate a completion. With --model (or none: the built-in model) it runs "
                                   "in this process; with --target HOST:PORT it calls a running `mesh serve`, "
                                   "whose engine settings apply (engine flags are refused there).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", help="model directory in HF format, or a Hugging Face Hub id such as "
                                       "Qwen/Qwen3-Coder-30B-A3B-Instruct (env MESH_MODEL; default: the built-in "
                                       "model)")
    where.add_argument("--target", help="HOST:PORT of a running `mesh serve`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    what.add_argument("--prompt-ids", type=int_list, help="prompt as comma-separated token ids, e.g. 1,2,3")
    add_sampling_flags(p)
    add_engine_flags(p)
    add_client_security_flags(p)
    p.add_argument("--json", action="store_true",
                   help='print each completion as one JSON object on its own line: {"request_id", "index", '
                        '"token_ids", "text", "finish_reason", "usage"} (and "logprobs" with --logprobs)')
    p.set_defaults(func=cmd_generate)

    serve_register(sub)
    loadtest_register(sub)
    admin_register(sub)
    deploy_register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


