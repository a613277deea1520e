"""The `mesh` command line: init-model, generate, serve, loadtest, plan.

Every flag also reads a `MESH_*` environment variable where one is named in its help.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_ARCH, DEFAULT_PRESET = "qwen3_moe", "small"  # mesh init-model's defaults


def _env(name: str, default=None):
    return os.environ.get(name, default)


def default_model_dir() -> Path:
    """The built-in model: a small Qwen3-MoE trained on Python source (scripts/train_builtin_model.py),
    shipped in the package (mesh/builtin/)."""
    return Path(__file__).resolve().parent / "builtin"


def _looks_like_hub_id(model: str) -> bool:
    """`org/name` (one slash, no leading dot or slash): a Hugging Face Hub id, unless such a directory exists."""
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not Path(model).exists())


def resolve_model(model: str | None, load_format: str = "auto", revision: str | None = None) -> Path:
    """--model DIR or a Hub id, else $MESH_MODEL, else the built-in default (created on first use)."""
    model = model or _env("MESH_MODEL")
    if model:
        path = Path(model)
        if _looks_like_hub_id(model):
            from router_service.hub import resolve_hub_model  # huggingface_hub (an HTTP client) lives at the edge
            path = resolve_hub_model(model, revision, weights=load_format != "dummy")
        elif revision:
            raise SystemExit(f"mesh: error: --revision {revision}: applies to Hugging Face Hub ids, and "
                             f"--model {model} is a directory")
        if not (path / "config.json").is_file():
            raise SystemExit(f"mesh: error: --model {model}: no config.json there "
                             f"(create one with `mesh init-model --out {model}`)")
        if load_format != "dummy" and not any(path.glob("*.safetensors")):
            raise SystemExit(f"mesh: error: --model {model}: no *.safetensors weights there (a config-only "
                             f"model directory runs with --load-format dummy)")
        return path
    path = default_model_dir()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise SystemExit(f"mesh: error: the built-in model is missing from this installation ({path}); reinstall "
                         f"moe-mesh, or pass --model")
    return path


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Given(argparse.Action):
    """Stores like argparse's default action and notes that the flag was given on the command line
    (`args.given_engine_flags`), so that `generate --target` can refuse engine flags it would ignore."""

    def __init__(self, option_strings, dest, nargs=None, const=None, **kw):
        self._flag = nargs == 0
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self._flag else values)
        given = getattr(namespace, "given_engine_flags", None) or []
        namespace.given_engine_flags = given + [self.option_strings[0]]


def _flag(g, *names, **kw) -> None:
    """An on/off engine flag (store_true) that records being given."""
    g.add_argument(*names, action=_Given, nargs=0, const=True, default=False, **kw)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the engine run in this process (`serve`, `generate` without --target)."""
    from mesh.config import default_dtype
    g = p.add_argument_group("engine (this process's model; not with generate --target)")

    def add(*names, **kw):
        g.add_argument(*names, action=_Given, **kw)  # records being given

    add("--revision", default=_env("MESH_REVISION"),
        help="with a Hugging Face Hub id as --model: the branch, tag or commit to use (default: main; "
             "env MESH_REVISION)")
    add("--dtype", choices=["float32", "bfloat16"], default=_env("MESH_DTYPE") or default_dtype(),
        help="compute dtype (default: bfloat16 where this machine has fast bf16, else float32; env MESH_DTYPE)")
    add("--device", default=_env("MESH_DEVICE", "auto"),
        help="where the model runs: cpu, cuda or cuda:N (default auto: cuda when torch sees a GPU, else cpu; "
             "env MESH_DEVICE). With --workers each expert worker takes one GPU of its own")
    add("--kv-cache-memory", default=_env("MESH_KV_CACHE_MEMORY", "1G"),
        help="bytes for the paged KV pool, e.g. 512M, 4G (default 1G; env MESH_KV_CACHE_MEMORY)")
    add("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    add("--max-num-seqs", type=int, default=256, help="most sequences running in one step (default 256)")
    add("--max-num-batched-tokens", type=int, default=2048,
        help="token budget of one step; longer prompts are prefilled in chunks (default 2048)")
    add("--max-model-len", type=int, default=None,
        help="longest sequence served, prompt plus output (default: the model's limit)")
    _flag(g, "--no-prefix-caching", help="do not share KV blocks between prompts")
    add("--state-snapshot-interval", type=int, default=1,
        help="hybrid models (Qwen3-Next): snapshot the linear layers' recurrent state every N KV blocks, so "
             "cached prefixes of those lengths restore it; larger N trades prefix-cache granularity for "
             "memory, 0 turns hybrid prefix caching off (default 1)")
    add("--micro-batches", type=int, choices=[0, 1, 2], default=0,
        help="micro-batches in flight per step: 2 overlaps one's attention with the other's expert round trip "
             "(default 0 = auto: 2 with expert workers on GPUs, else 1)")
    add("--backend", choices=["auto", "torch", "cpu", "cuda"], default=_env("MESH_BACKEND", "auto"),
        help="the model's kernels: cuda (Triton kernels and CUDA graphs), cpu (the C kernels), torch (plain "
             "torch ops, the reference) (default auto: cuda on a GPU, cpu on the CPU; env MESH_BACKEND)")
    _flag(g, "--enforce-eager",
          help="on a GPU, run decode steps eagerly instead of replaying CUDA graphs captured at start")
    add("--moe-kernel", choices=["auto", "triton", "grouped_mm"], default="auto",
        help="the cuda backend's expert kernel: triton (the fused MoE kernels) or grouped_mm (torch's grouped "
             "GEMM, bf16 on sm90+) (default auto: triton)")
    add("--load-format", choices=["auto", "dummy"], default=_env("MESH_LOAD_FORMAT", "auto"),
        help="auto: the checkpoint's weights; dummy: random weights made on the device from config.json "
             "alone, for benchmarks of real model shapes (default auto; env MESH_LOAD_FORMAT)")


def resolve_device(text: str) -> str:
    """--device: auto -> cuda or cpu; a CUDA device torch cannot see is a CLI error naming the flag."""
    import torch
    text = text.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise SystemExit(f"mesh: error: --device {text}: torch sees no CUDA device (use --device cpu)")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise SystemExit(f"mesh: error: --device {text}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
        return text
    raise SystemExit(f"mesh: error: --device {text!r}: expected cpu, cuda, cuda:N or auto")


def engine_config(args):
    from mesh.config import ConfigError, EngineConfig, parse_size
    try:
        return EngineConfig(dtype=args.dtype, block_size=args.block_size, device=resolve_device(args.device),
                            kv_cache_memory=parse_size(str(args.kv_cache_memory)),
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                            micro_batches=args.micro_batches, backend=args.backend,
                            enforce_eager=args.enforce_eager, moe_kernel=args.moe_kernel,
                            load_format=args.load_format, state_snapshot_interval=args.state_snapshot_interval)
    except ConfigError as e:
        raise SystemExit(f"mesh: error: {e}") from None


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags; their defaults are the API's (mesh.types), so the CLI, gRPC and HTTP agree."""
    from mesh.types import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_LOGPROBS, MAX_N
    g = p.add_argument_group("sampling (defaults as in the gRPC and HTTP APIs)")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"0 = greedy, higher = more random (default {DEFAULT_TEMPERATURE:g})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--n", type=int, default=1,
                   help=f"completions of the prompt, in [1, {MAX_N}]; the prompt is computed once (default 1)")
    g.add_argument("--logprobs", type=int, default=None,
                   help=f"with --json: each token's log probability and the N likeliest alternatives', N in "
                        f"[0, {MAX_LOGPROBS}] (default: none)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once from the logit of every token already generated, in [-2, 2] (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted from a token's logit once per time it was generated, in [-2, 2] (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides positive and multiplies negative logits of tokens in the prompt or output, > 0 "
                        "(default 1: off)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="no end-of-sequence or stop token before this many tokens (default 0)")


_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "n", "logprobs",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")


def sampling_kwargs(args) -> dict:
    """The sampling flags as SamplingParams arguments, checked: an error names the flag."""
    from mesh.types import InvalidRequest, SamplingParams
    kw = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    kw["stop"], kw["ignore_eos"] = tuple(kw["stop"] or ()), bool(kw["ignore_eos"])
    try:
        SamplingParams(**kw)
    except InvalidRequest as e:
        field = str(e).split(" ", 1)[0]
        flag = f"--{field.replace('_', '-')}: " if field in _SAMPLING_FLAGS else ""
        raise SystemExit(f"mesh: error: {flag}{e}") from None
    return kw


def sampling_params(args):
    from mesh.types import SamplingParams
    return SamplingParams(**sampling_kwargs(args))


def add_client_security_flags(p) -> None:
    """How a client reaches a server with TLS and/or bearer tokens (only with --target)."""
    g = p.add_argument_group("connection to the server (with --target)")
    g.add_argument("--tls", action="store_true",
                   help="connect over TLS, verifying the server with the system's CA certificates (implied by "
                        "--tls-ca)")
    g.add_argument("--tls-ca", default=None,
                   help="PEM file of the CA that signed the server's certificate; connects over TLS (env MESH_TLS_CA)")
    g.add_argument("--tls-cert", default=None,
                   help="this client's certificate (PEM), for servers that require client certificates "
                        "(mutual TLS; env MESH_TLS_CLIENT_CERT)")
    g.add_argument("--tls-key", default=None,
                   help="the private key of --tls-cert (PEM; env MESH_TLS_CLIENT_KEY)")
    g.add_argument("--tls-server-name", default=None,
                   help="the name to expect in the server's certificate when it differs from --target's host")
    g.add_argument("--token-file", default=None,
                   help="file holding the bearer token for servers started with --auth-tokens-file (env "
                        "MESH_TOKEN_FILE, or the token itself in MESH_API_TOKEN)")


def client_security(args) -> dict:
    """MeshClient keyword arguments from add_client_security_flags' flags; SystemExit naming a bad one."""
    env = os.environ.get
    token, token_file = env("MESH_API_TOKEN") or None, args.token_file or env("MESH_TOKEN_FILE")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"mesh: error: --token-file {token_file}: {e.strerror or e}") from None
        if not token:
            raise SystemExit(f"mesh: error: --token-file {token_file} is empty")
    ca = args.tls_ca or env("MESH_TLS_CA")
    cert, key = args.tls_cert or env("MESH_TLS_CLIENT_CERT"), args.tls_key or env("MESH_TLS_CLIENT_KEY")
    if (cert is None) != (key is None):
        raise SystemExit("mesh: error: --tls-cert and --tls-key go together: give both")
    return dict(token=token, tls=args.tls, tls_ca=ca, tls_cert=cert, tls_key=key,
                tls_server_name=args.tls_server_name)


def reject_engine_flags(args) -> None:
    """With --target the server's engine runs: a flag of this process's engine would be ignored."""
    given = getattr(args, "given_engine_flags", None)
    if given:
        flags = ", ".join(dict.fromkeys(given))
        raise SystemExit(f"mesh: error: {flags}: engine flags do not apply with --target (the server's own "
                         f"settings do); drop them or run without --target")


def cmd_init_model(args) -> int:
    from mesh.presets import init_model
    t0 = time.perf_counter()
    try:
        out = init_model(args.arch, args.preset, args.out, seed=args.seed, dtype=args.dtype, progress=_progress,
                         config_only=args.config_only)
    except ValueError as e:
        raise SystemExit(f"mesh: error: {e}") from None
    _progress(f"wrote {args.arch}/{args.preset} to {out} in {time.perf_counter() - t0:.1f}s")
    if args.json:
        print(json.dumps({"model_dir": str(out), "arch": args.arch, "preset": args.preset, "seed": args.seed}))
    return 0


def cmd_generate(args) -> int:
    if args.target:
        reject_engine_flags(args)
        from router_service.client_cli import generate_remote
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
        _progress(f"[{engine.model_config.family}, {args.dtype}] {time.perf_counter() - t0:.2f}s")
    except InvalidRequest as e:
        raise SystemExit(f"mesh: error: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mesh.presets import ARCHS, PRESETS
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
    what.add_argument("--prompt-ids", type=_int_list, help="prompt as comma-separated token ids, e.g. 1,2,3")
    add_sampling_flags(p)
    add_engine_flags(p)
    add_client_security_flags(p)
    p.add_argument("--json", action="store_true",
                   help='print each completion as one JSON object on its own line: {"request_id", "index", '
                        '"token_ids", "text", "finish_reason", "usage"} (and "logprobs" with --logprobs)')
    p.set_defaults(func=cmd_generate)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Subcommands that live with their edge packages (imported lazily: grpc, ray and redis load only
    when such a command runs)."""
    from router_service.cli import register as serve_register
    from router_service.loadtest.cli import register as loadtest_register
    return [serve_register, loadtest_register]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
