"""Train the built-in model: a small Qwen3-MoE (Qwen3-Coder's architecture) on the Python source of
this machine, with a byte-level BPE tokenizer trained on the same files.

    python scripts/train_builtin_model.py --out mesh/builtin            # CPU: about an hour on 2 cores
    python scripts/train_builtin_model.py --out /tmp/m --device cuda     # the same run, faster

Corpus: every `.py` file of the interpreter's standard library and of its installed packages
(site-packages), read as UTF-8, deduplicated by content. A file is held out when the hash of its
content falls in the held-out bucket (`held_out`), so the split does not depend on where the files
lie, and identical copies of one file always land on the same side. Training never sees held-out
files: the tokenizer is trained on training files only, and `scripts/eval_builtin_model.py` draws its
function headers from held-out files only.

Windows of --seq-len tokens are cut from each file from its first token on (the last one padded), so a
sixteenth or so of them start where a file starts: the model learns that the start of its context is
column 0 of a file, which is what a bare prompt such as `def fibonacci(n):` is.

Reproducible from `--seed` on the same corpus: the same files are sampled (by content hash), the
weights start from `torch.manual_seed(seed)`, and training windows come in an order drawn from
`numpy.random.default_rng(seed)`. The run prints the held-out loss (mean next-token cross-entropy,
nats per token, over fixed windows of held-out files) as it goes and at the end, and records it with
the corpus digest in `training_info.json`. Checkpoints go to `--out/checkpoint.pt` every
`--checkpoint-every` steps; `--resume` continues from one (same data order, same schedule).

The model is written as Hugging Face safetensors (per-expert keys, bfloat16) by transformers' own
`save_pretrained`, so the engine and transformers both load it. transformers is used here for the
training forward and backward only (the test extra); serving never imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mesh.presets import CHAT_TEMPLATE, EOS_TOKEN, SPECIAL_TOKENS  # noqa: E402

HELD_OUT_BUCKETS = 50  # one file in 50 is held out
MAX_FILE_BYTES = 256 << 10  # larger .py files are mostly generated tables
SKIP_DIRS = {"__pycache__", "test", "tests", "idle_test", "testing", "_vendor", "vendored", "site-packages"}

# ---- corpus ----------------------------------------------------------------------------------
def source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return list(dict.fromkeys(r.resolve() for r in roots if r.is_dir()))


def python_files(roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # site-packages inside the stdlib tree is walked as its own root, not twice
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".dist-info"))
            found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return found


def content_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def held_out(key: int) -> bool:
    return key % HELD_OUT_BUCKETS == 0


def load_corpus(max_train_bytes: int) -> tuple[list[str], list[str], str]:
    """(training texts, held-out texts, digest of both). Training texts are sampled by content hash
    up to about `max_train_bytes`, so the same machine gives the same sample whatever the walk order."""
    seen: dict[int, str] = {}
    for f in python_files(source_roots()):
        try:
            if f.stat().st_size > MAX_FILE_BYTES or f.stat().st_size < 64:
                continue
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        seen.setdefault(content_key(text), text)
    keys = sorted(seen)
    held = [seen[k] for k in keys if held_out(k)]
    train_keys = [k for k in keys if not held_out(k)]
    total = sum(len(seen[k]) for k in train_keys)
    # Keep keys below a threshold: a uniform sample by content hash, of about the size asked for.
    frac = min(1.0, max_train_bytes / max(1, total))
    limit = int(frac * 2**64)
    train = [seen[k] for k in train_keys if (k * 0x9E3779B97F4A7C15) % 2**64 < limit]
    digest = hashlib.sha256()
    for k in keys:
        if held_out(k) or (k * 0x9E3779B97F4A7C15) % 2**64 < limit:
            digest.update(k.to_bytes(8, "little"))
    return train, held, digest.hexdigest()


# ---- tokenizer -------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (no prefix space: decode(encode(s)) == s), specials last as in Qwen vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


PAD = 65535  # marks window positions past a file's end: no target there (ids are < vocab <= 65535)


def file_windows(tok, texts: list[str], seq_len: int) -> tuple[np.ndarray, int]:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) [N, seq_len + 1], uint16, each file cut
    from its first token on (its end-of-text token last, the last window padded with PAD); and the
    token count. Windows start where files start, so the model learns that the start of its context is
    the start of a file, in column 0: a prompt such as `def fibonacci(n):` is read as a top-level
    function, not as a method whose indentation scrolled out of view."""
    eos = tok.token_to_id(EOS_TOKEN)
    out, total = [], 0
    for i in range(0, len(texts), 256):
        for enc in tok.encode_batch(texts[i:i + 256], add_special_tokens=False):
            ids = np.asarray(enc.ids + [eos], dtype=np.uint16)
            total += len(ids)
            n = -(-(len(ids) - 1) // seq_len)  # windows covering every target
            padded = np.full(n * seq_len + 1, PAD, dtype=np.uint16)
            padded[:len(ids)] = ids
            idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
            out.append(padded[idx])
    return np.concatenate(out), total


def inputs_targets(w: np.ndarray, eos: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows as (input ids, targets with -100 where there is no target)."""
    x = torch.from_numpy(w.astype(np.int64)).to(device)
    inputs = x[:, :-1].masked_fill(x[:, :-1] == PAD, eos)  # causal: padding after a file's end changes nothing before
    targets = x[:, 1:].masked_fill(x[:, 1:] == PAD, -100)
    return inputs, targets


# ---- model -----------------------------------------------------------------------------------
def model_config(args, vocab_size: int, eos: int):
    import transformers as tf
    return tf.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_size,
        intermediate_size=args.expert_size * args.top_k, norm_topk_prob=True, mlp_only_layers=[],
        max_position_embeddings=args.max_positions, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos, pad_token_id=eos,
        output_router_logits=True, router_aux_loss_coef=args.aux_loss, initializer_range=0.02)


@torch.no_grad()
def held_out_loss(model, data: np.ndarray, batch: int, eos: int, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        inputs, targets = inputs_targets(data[i:i + batch], eos, device)
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum", ignore_index=-100)
        total += loss.item()
        count += int((targets != -100).sum())
    model.train()
    return total / count


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_model(model, tok, out: Path, info: dict) -> None:
    import transformers as tf
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    export = tf.Qwen3MoeForCausalLM(model.config)
    export.load_state_dict(model.state_dict())
    export.config.output_router_logits = False
    export.to(torch.bfloat16).save_pretrained(out)
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600; expert workers may run as another user
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TOKEN)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}, indent=2)
                                                + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "model_max_length": model.config.max_position_embeddings, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "chat_template": CHAT_TEMPLATE}, indent=2, sort_keys=True) + "\n")
    (out / "training_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the built-in Qwen3-MoE model on this machine's Python "
                                            "source; prints the held-out loss.")
    p.add_argument("--out", required=True, help="directory to write the model to (config, safetensors, tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps (default 700)")
    p.add_argument("--batch", type=int, default=16, help="windows per step (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3, cosine to a tenth)")
    p.add_argument("--warmup", type=int, default=40, help="linear warm-up steps (default 40)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--aux-loss", type=float, default=0.01, help="router load-balancing loss weight (default 0.01)")
    p.add_argument("--corpus-mb", type=float, default=24, help="training text to sample, in MB (default 24)")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer size including special tokens (default 4096)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--head-dim", type=int, default=32, help="head dimension (default 32)")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--expert-size", type=int, default=256, help="expert intermediate size (default 256)")
    p.add_argument("--max-positions", type=int, default=2048, help="max_position_embeddings (default 2048)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows the loss is measured on (default 64)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations (default 250)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train_texts, held_texts, digest = load_corpus(int(args.corpus_mb * 1e6))
    print(f"corpus: {len(train_texts)} training files ({sum(map(len, train_texts)) / 1e6:.1f} M chars), "
          f"{len(held_texts)} held out; digest {digest[:16]}", flush=True)
    tok = train_tokenizer(train_texts, args.vocab)
    eos = tok.token_to_id(EOS_TOKEN)
    train_w, n_train = file_windows(tok, train_texts, args.seq_len)
    # the held-out loss needs --eval-windows windows: encode the first held-out files (by content hash) only
    sample, size = [], 0
    for text in held_texts:
        if size > args.eval_windows * args.seq_len * 8:  # ~2-4 chars a token: comfortably enough
            break
        sample.append(text)
        size += len(text)
    eval_w, n_held = file_windows(tok, sample, args.seq_len)
    print(f"tokenizer: vocab {tok.get_vocab_size()}; {n_train / 1e6:.2f} M training tokens "
          f"({sum(map(len, train_texts)) / n_train:.2f} chars/token), {n_held / 1e6:.2f} M held out "
          f"[{time.time() - t0:.0f}s]", flush=True)
    eval_w = eval_w[np.random.default_rng(12345).permutation(len(eval_w))[:args.eval_windows]]
    order = np.random.default_rng(args.seed).permutation(len(train_w))
    epochs = args.steps * args.batch / len(train_w)
    print(f"data: {len(train_w)} windows of {args.seq_len}; {args.steps} steps x {args.batch} = {epochs:.2f} epochs",
          flush=True)

    import transformers as tf
    torch.manual_seed(args.seed)
    cfg = model_config(args, tok.get_vocab_size(), eos)
    model = tf.Qwen3MoeForCausalLM(cfg).to(args.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    start = 0
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=args.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed at step {start}", flush=True)
    print(f"model: {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, {args.experts} "
          f"experts top-{args.top_k}, expert size {args.expert_size})", flush=True)

    t_train, seen, losses = time.time(), 0, []
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        pick = [order[(step * args.batch + j) % len(order)] for j in range(args.batch)]
        inputs, targets = inputs_targets(train_w[pick], eos, args.device)
        outs = model(input_ids=inputs)  # with output_router_logits: aux_loss, the load-balancing term
        logits = outs.logits.float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100)
        loss = ce + (args.aux_loss * outs.aux_loss if outs.aux_loss is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += inputs.numel()
        losses.append(ce.item())
        if (step + 1) % 20 == 0:
            rate = seen / (time.time() - t_train)
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-20:]):.3f} lr {lr_at(step, args):.2e} "
                  f"{rate:.0f} tok/s", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"step {step + 1}: held-out loss {held_out_loss(model, eval_w, args.batch, eos, args.device):.4f}",
                  flush=True)
        if (step + 1) % args.checkpoint_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)

    final = held_out_loss(model, eval_w, args.batch, eos, args.device)
    minutes = (time.time() - t0) / 60
    print(f"held-out loss {final:.4f} nats/token (perplexity {math.exp(final):.1f}) on "
          f"{len(eval_w)} windows of {args.seq_len} held-out tokens; {minutes:.1f} min", flush=True)
    info = {"held_out_loss": round(final, 4), "held_out_tokens": int((eval_w[:, 1:] != PAD).sum()), "seed": args.seed,
            "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "corpus_digest": digest,
            "training_files": len(train_texts), "held_out_files": len(held_texts),
            "training_tokens": n_train, "parameters": n_params, "device": args.device,
            "minutes": round(minutes, 1), "torch": torch.__version__, "transformers": tf.__version__}
    save_model(model, tok, out, info)
    ckpt.unlink(missing_ok=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
