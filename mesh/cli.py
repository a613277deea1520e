"""The core's pieces of the `mesh` command line: the engine and sampling flags (shared by `generate`
and `serve`), the engine configuration they make, and `init-model`.

The command itself (`mesh`, module mesh_cli) composes these with the edge's commands; mesh/ imports no
edge package (router_service, expert_workers). Every flag also reads a `MESH_*` environment variable
where one is named in its help.
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


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
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
        out = init_model(args.arch, args.preset, args.out, seed=args.seed, dtype=args.dtype, progress=progress,
                         config_only=args.config_only)
    except ValueError as e:
        raise SystemExit(f"mesh: error: {e}") from None
    progress(f"wrote {args.arch}/{args.preset} to {out} in {time.perf_counter() - t0:.1f}s")
    if args.json:
        print(json.dumps({"model_dir": str(out), "arch": args.arch, "preset": args.preset, "seed": args.seed}))
    return 0
