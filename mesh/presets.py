"""Random-weight Hugging Face checkpoints of known shapes, for tests, demos and benchmarks.

`init_model` writes a directory that both transformers (`AutoModelForCausalLM.from_pretrained`) and
`mesh.model.loader.load_model` load: `config.json` spelled as transformers 5.x writes it,
`model.safetensors` (or shards plus an index) with per-expert keys as on the Hub, and a byte-level BPE
`tokenizer.json` trained on the interpreter's own standard library, so generated text is Python-ish
tokens rather than bytes. The same seed gives byte-identical weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mesh.config import DTYPES
from mesh.model.families import FAMILIES

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "qwen3_next")
_ARCH_CLASS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "mixtral": "MixtralForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense layers (mlp_only_layers)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    mlp_only_layers: tuple[int, ...] = ()  # qwen3_moe only: layers with a dense MLP
    rope_theta: float = 1000000.0
    # a real model's shape: too large to write random weights to disk (init-model --config-only, then
    # serve with --load-format dummy)
    config_only: bool = False
    # qwen3_next (hybrid): Gated DeltaNet layers' key and value heads and their dim (keys and values
    # alike), every `full_attention_interval`-th layer full attention; the shared expert's width
    linear_key_heads: int = 2
    linear_value_heads: int = 4
    linear_head_dim: int = 32
    full_attention_interval: int = 4
    shared_expert_intermediate_size: int = 0  # 0: twice moe_intermediate_size (qwen2_moe, qwen3_next)

    @property
    def summary(self) -> str:
        return (f"hidden {self.hidden_size}, {self.num_layers} layers, {self.num_experts} experts "
                f"top-{self.top_k}, vocab {self.vocab_size}")


PRESETS = {
    "tiny": Preset(64, 2, 8, 2, 32, 128, 4, 2, 16, 512, 2048, mlp_only_layers=(1,)),
    "small": Preset(256, 4, 16, 4, 128, 512, 8, 2, 32, 4096, 4096),
    "bench": Preset(512, 8, 16, 4, 256, 1024, 8, 2, 64, 8192, 4096),
    # Qwen3-Coder-30B-A3B-Instruct and Qwen3-Coder-480B-A35B-Instruct (their config.json shapes)
    "coder-30b-a3b": Preset(2048, 48, 128, 8, 768, 6144, 32, 4, 128, 151936, 262144, rope_theta=10000000.0,
                            config_only=True),
    "coder-480b-a35b": Preset(6144, 62, 160, 8, 2560, 8192, 96, 8, 128, 151936, 262144, rope_theta=10000000.0,
                              config_only=True),
    # Qwen3-Coder-Next (qwen3_next): 80B parameters, 3B active
    "coder-next": Preset(2048, 48, 512, 10, 512, 5120, 16, 2, 256, 151936, 262144, rope_theta=5000000.0,
                         config_only=True, linear_key_heads=16, linear_value_heads=32, linear_head_dim=128,
                         shared_expert_intermediate_size=512),
}
REAL_PRESET_ARCH = {"coder-30b-a3b": "qwen3_moe", "coder-480b-a35b": "qwen3_moe", "coder-next": "qwen3_next"}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                  "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
EOS_TOKEN = "<|endoftext|>"
# ChatML, the chat format of Qwen's models: `<|im_start|>role\ncontent<|im_end|>\n` per message, then
# the assistant's header when a reply is wanted. Rendered by transformers' apply_chat_template and by
# the HTTP API's /v1/chat/completions alike.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEFAULT_MAX_SHARD_BYTES = 2 << 30
CORPUS_MAX_BYTES = 3 << 20
# Bump when the training recipe changes, so cached tokenizers from the old recipe are not reused.
_TOKENIZER_RECIPE = "bpe-bytelevel-v1"
_INIT_STD = 0.02

Progress = Callable[[str], None] | None


def _say(progress: Progress, line: str) -> None:
    if progress is not None:
        progress(line)


def _check(arch: str, preset: str, dtype: str) -> Preset:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return PRESETS[preset]


def hf_config(arch: str, p: Preset, eos_token_id: int, dtype: str = "float32") -> dict:
    """config.json contents with the fields transformers 5.x writes for `arch`."""
    cfg = {
        "architectures": [_ARCH_CLASS[arch]], "model_type": arch, "dtype": dtype,
        "vocab_size": p.vocab_size, "hidden_size": p.hidden_size, "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads, "num_key_value_heads": p.num_kv_heads, "head_dim": p.head_dim,
        "num_experts_per_tok": p.top_k, "max_position_embeddings": p.max_position_embeddings,
        "hidden_act": "silu", "initializer_range": _INIT_STD, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": p.rope_theta, "rope_type": "default"},
        "attention_dropout": 0.0, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
    }
    if arch == "mixtral":
        # Mixtral's experts are its only FFN, so its intermediate_size is the expert width.
        cfg.update(num_local_experts=p.num_experts, intermediate_size=p.moe_intermediate_size,
                   rms_norm_eps=1e-5, router_jitter_noise=0.0)
        return cfg
    cfg.update(num_experts=p.num_experts, moe_intermediate_size=p.moe_intermediate_size,
               intermediate_size=p.intermediate_size, decoder_sparse_step=1, use_sliding_window=False)
    if arch == "qwen3_next":
        cfg.update(norm_topk_prob=True, mlp_only_layers=[], attention_bias=False,
                   shared_expert_intermediate_size=_shared_width(p),
                   layer_types=["full_attention" if (i + 1) % _interval(p) == 0 else "linear_attention"
                                for i in range(p.num_layers)],
                   linear_num_key_heads=p.linear_key_heads, linear_num_value_heads=p.linear_value_heads,
                   linear_key_head_dim=p.linear_head_dim, linear_value_head_dim=p.linear_head_dim,
                   linear_conv_kernel_dim=4)
        cfg["rope_parameters"]["partial_rotary_factor"] = 0.25
        return cfg
    if arch == "qwen3_moe":
        cfg.update(attention_bias=False, norm_topk_prob=True, mlp_only_layers=list(p.mlp_only_layers))
    else:
        cfg.update(qkv_bias=True, norm_topk_prob=False, mlp_only_layers=[],
                   shared_expert_intermediate_size=_shared_width(p),
                   max_window_layers=p.num_layers, layer_types=["full_attention"] * p.num_layers)
    return cfg


def _interval(p: Preset) -> int:
    """Every this-many-th layer is full attention (at least the last layer of a short preset)."""
    return min(p.full_attention_interval, p.num_layers)


def _shared_width(p: Preset) -> int:
    return p.shared_expert_intermediate_size or 2 * p.moe_intermediate_size


def tensor_specs(arch: str, p: Preset) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every tensor, in generation order; init is 'normal' | 'ones' | 'zeros' |
    'bias'."""
    H, D, E = p.hidden_size, p.head_dim, p.num_experts
    q, kv = p.num_heads * D, p.num_kv_heads * D
    I = p.moe_intermediate_size
    fam = FAMILIES[arch]
    dense = set(p.mlp_only_layers) if arch == "qwen3_moe" else set()
    hybrid = arch == "qwen3_next"
    norm_init = "zeros" if hybrid else "ones"  # Qwen3-Next's norms are zero-centred: scale 1 + w
    specs = [("model.embed_tokens.weight", (p.vocab_size, H), "normal")]
    for i in range(p.num_layers):
        a = f"model.layers.{i}.self_attn."
        specs.append((f"model.layers.{i}.input_layernorm.weight", (H,), norm_init))
        if hybrid and (i + 1) % _interval(p):
            specs += _gated_delta_net_specs(f"model.layers.{i}.linear_attn.", p)
        else:
            for proj, rows in (("q_proj", 2 * q if hybrid else q), ("k_proj", kv), ("v_proj", kv)):
                specs.append((a + proj + ".weight", (rows, H), "normal"))
                if arch == "qwen2_moe":
                    specs.append((a + proj + ".bias", (rows,), "bias"))
            if arch in ("qwen3_moe", "qwen3_next"):
                specs += [(a + "q_norm.weight", (D,), norm_init), (a + "k_norm.weight", (D,), norm_init)]
            specs.append((a + "o_proj.weight", (H, q), "normal"))
        specs.append((f"model.layers.{i}.post_attention_layernorm.weight", (H,), norm_init))
        m = f"model.layers.{i}.{fam.moe_prefix}."
        if i in dense:
            Id = p.intermediate_size
            specs += [(m + "gate_proj.weight", (Id, H), "normal"), (m + "up_proj.weight", (Id, H), "normal"),
                      (m + "down_proj.weight", (H, Id), "normal")]
            continue
        specs.append((fam.router_key(i), (E, H), "normal"))
        for e in range(E):
            specs += [(fam.expert_key(i, e, fam.gate), (I, H), "normal"),
                      (fam.expert_key(i, e, fam.up), (I, H), "normal"),
                      (fam.expert_key(i, e, fam.down), (H, I), "normal")]
        if arch in ("qwen2_moe", "qwen3_next"):
            Is = _shared_width(p)
            specs += [(m + "shared_expert.gate_proj.weight", (Is, H), "normal"),
                      (m + "shared_expert.up_proj.weight", (Is, H), "normal"),
                      (m + "shared_expert.down_proj.weight", (H, Is), "normal"),
                      (m + "shared_expert_gate.weight", (1, H), "normal")]
    specs.append(("model.norm.weight", (H,), norm_init))
    specs.append(("lm_head.weight", (p.vocab_size, H), "normal"))
    return specs


def _gated_delta_net_specs(prefix: str, p: Preset) -> list[tuple[str, tuple[int, ...], str]]:
    hk, hv, d = p.linear_key_heads, p.linear_value_heads, p.linear_head_dim
    conv = 2 * hk * d + hv * d
    return [(prefix + "in_proj_qkvz.weight", (2 * hk * d + 2 * hv * d, p.hidden_size), "normal"),
            (prefix + "in_proj_ba.weight", (2 * hv, p.hidden_size), "normal"),
            (prefix + "conv1d.weight", (conv, 1, 4), "normal"),
            (prefix + "dt_bias", (hv,), "ones"), (prefix + "A_log", (hv,), "normal"),
            (prefix + "norm.weight", (d,), "ones"), (prefix + "out_proj.weight", (p.hidden_size, hv * d), "normal")]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_weights(specs: list[tuple[str, tuple[int, ...], str]], out_dir: Path, seed: int,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  progress: Progress = None) -> list[Path]:
    """Generate and write the tensors of `specs`, one shard in memory at a time.

    Values are drawn in float32 in spec order from one seeded generator, whatever the shard layout
    or dtype, so sharded and single-file checkpoints of one seed hold the same numbers."""
    tdtype = DTYPES[dtype]
    itemsize = torch.finfo(tdtype).bits // 8
    # Plan shard boundaries first: file names carry the shard count.
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, shape, _) in enumerate(specs):
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    for stale in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / "model.safetensors",
                  out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a left-over file would be read as part of this checkpoint
    gen = torch.Generator().manual_seed(seed)
    n = len(shards)
    names = (["model.safetensors"] if n == 1
             else [f"model-{s + 1:05d}-of-{n:05d}.safetensors" for s in range(n)])
    weight_map, total = {}, 0
    for fname, members in zip(names, shards):
        tensors = {}
        for k in members:
            name, shape, init = specs[k]
            if init == "ones":
                t = torch.ones(shape)
            elif init == "zeros":
                t = torch.zeros(shape)
            else:
                t = torch.empty(shape).normal_(0.0, _INIT_STD, generator=gen)
            tensors[name] = t.to(tdtype).contiguous()
            weight_map[name] = fname
            total += tensors[name].numel() * itemsize
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        os.chmod(out_dir / fname, 0o644)  # safetensors writes 0600; workers may run as another user
        _say(progress, f"wrote {fname} ({len(tensors)} tensors)")
    if n > 1:
        index = {"metadata": {"total_size": total,
                              "total_parameters": sum(_numel(s) for _, s, _ in specs)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / f for f in names]


def corpus_files(max_bytes: int = CORPUS_MAX_BYTES) -> list[Path]:
    """Standard-library `.py` files up to `max_bytes`, every k-th in sorted path order so the sample
    spans the whole library (tests and vendored packages skipped: odd encodings, repetitive fixtures)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    sizes = [f.stat().st_size for f in found]
    stride = max(1, -(-sum(sizes) // max_bytes))  # ceil: about max_bytes in all
    out, total = [], 0
    for f, size in list(zip(found, sizes))[::stride]:
        if total + size > max_bytes:
            continue  # too big for what is left; smaller files further on may still fit
        out.append(f)
        total += size
    return out


def _cache_dir() -> Path:
    base = os.environ.get("MESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe-mesh")
    return Path(base) / "tokenizers"


def train_tokenizer(vocab_size: int, progress: Progress = None, use_cache: bool = True) -> _HFTokenizer:
    """A byte-level BPE with `vocab_size` ids in all: merges first, the special tokens last (as in
    Qwen vocabularies). Cached per vocab size and corpus, since training takes seconds."""
    files = corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    listing = "".join(f"{f.relative_to(root)}\t{f.stat().st_size}\n" for f in files)
    key = hashlib.sha256(f"{_TOKENIZER_RECIPE}\n{tokenizers.__version__}\n{listing}".encode()).hexdigest()
    cached = _cache_dir() / f"vocab{vocab_size}-{key[:16]}.json"
    if use_cache and cached.is_file():
        _say(progress, f"tokenizer: using cached {cached}")
        return _HFTokenizer.from_file(str(cached))
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    _say(progress, f"tokenizer: training byte-level BPE, vocab {vocab_size}, on {len(texts)} files "
                   f"({sum(map(len, texts)) / 1e6:.1f} M chars) of {root}")
    tok = _HFTokenizer(models.BPE())
    # Plain ByteLevel: no prefix space, so decode(encode(text)) == text for any string.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        # every byte is a token, so text outside the corpus (emoji, CJK) still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tok.save(str(tmp))
            os.replace(tmp, cached)  # atomic: concurrent runs never read a half-written file
        except OSError as e:
            _say(progress, f"tokenizer: not cached ({e})")
    return tok


def init_model(arch: str, preset: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "float32",
               progress: Progress = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               config_only: bool = False) -> Path:
    """Write a random-weight `arch` model of size `preset` to `out_dir` (with `config_only`, its
    config.json and tokenizer alone); returns the directory."""
    p = _check(arch, preset, dtype)
    if p.config_only and not config_only:
        params = sum(_numel(s) for _, s, _ in tensor_specs(arch, p))
        raise ValueError(f"--preset {preset} has {params / 1e9:.1f}B parameters ({params * 2 / 1e9:.0f} GB in "
                         f"bfloat16): pass --config-only and run it with --load-format dummy")
    if p.config_only and arch != REAL_PRESET_ARCH[preset]:
        raise ValueError(f"--preset {preset} is a {REAL_PRESET_ARCH[preset]} shape: use --arch {REAL_PRESET_ARCH[preset]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(p.vocab_size, progress)
    if tok.get_vocab_size(with_added_tokens=True) > p.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, more than the model's {p.vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TOKEN)

    def dump(name: str, data: dict) -> None:
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    dump("config.json", hf_config(arch, p, eos, dtype))
    dump("generation_config.json", {"eos_token_id": eos, "pad_token_id": eos})
    dump("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "model_max_length": p.max_position_embeddings, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "chat_template": CHAT_TEMPLATE})
    specs = tensor_specs(arch, p)
    params = sum(_numel(s) for _, s, _ in specs)
    if config_only:
        for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)  # a config-only directory must not pair with old weights
        _say(progress, f"config only: {arch} {preset} ({p.summary}), {params / 1e9:.2f}B parameters; "
                       f"serve it with --load-format dummy")
        _say(progress, f"done: {out}")
        return out
    _say(progress, f"weights: {arch} {preset} ({p.summary}), {params / 1e6:.1f}M parameters, "
                   f"{dtype}, seed {seed}")
    write_weights(specs, out, seed, dtype, max_shard_bytes, progress)
    _say(progress, f"done: {out}")
    return out
