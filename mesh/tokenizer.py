"""Text <-> token ids over a model directory's `tokenizer.json`, using the `tokenizers` library only.

`IncrementalDetokenizer` turns a stream of generated ids into text deltas. Byte-level BPE splits
multi-byte UTF-8 characters across tokens, so a delta is held back while its text still ends in an
incomplete character (U+FFFD) and released once the character completes. Each step decodes only a
short window of ids (from `prefix_offset`), never the whole sequence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

# Names checkpoints of the Qwen family use for end of text / end of turn; either stops generation.
DEFAULT_EOS_TOKENS = ("<|endoftext|>", "<|im_end|>")
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, eos_token_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer | None":
        """The tokenizer of a model directory, or None when it has no `tokenizer.json`."""
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            return None
        tok = _HFTokenizer.from_file(str(path))
        return cls(tok, _eos_ids(tok, d))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        tok = _HFTokenizer.from_file(str(path))
        return cls(tok, _eos_ids(tok, None))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS or template: callers assemble prompts themselves (chat, FIM).
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """`<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>` as ids; the model writes
        the middle."""
        ids = [self.token_id(t) for t in FIM_TOKENS]
        missing = [t for t, i in zip(FIM_TOKENS, ids) if i is None]
        if missing:
            raise ValueError(
                f"this tokenizer has no fill-in-the-middle tokens ({', '.join(missing)} missing); "
                "use a code model whose tokenizer defines them")
        pre, suf, mid = ids
        # Each side is encoded on its own: BPE merges must not cross the special-token boundaries.
        return [pre, *self.encode(prefix), suf, *self.encode(suffix), mid]


def _eos_ids(tok: _HFTokenizer, model_dir: Path | None) -> tuple[int, ...]:
    """Ids named as EOS by generation_config.json / tokenizer_config.json, then the well-known
    end-of-text / end-of-turn tokens the vocabulary has, without duplicates."""
    out: list[int] = []
    if model_dir is not None:
        gen = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        for i in (gen if isinstance(gen, list) else [gen]):
            if isinstance(i, int):
                out.append(i)
        eos = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
        if isinstance(eos, dict):  # AddedToken serialised as {"content": ..., ...}
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            out.append(tok.token_to_id(eos))
    for name in DEFAULT_EOS_TOKENS:
        i = tok.token_to_id(name)
        if i is not None:
            out.append(i)
    return tuple(dict.fromkeys(out))


class IncrementalDetokenizer:
    """Streams the text of a growing id sequence.

    Invariant: `ids[prefix_offset:read_offset]` is text already emitted, kept as decoding context
    (some decoders render a token differently after another one); `ids[read_offset:]` is not yet
    emitted. Only these ids are kept, so memory and work per step stay bounded by the window.
    """

    # A UTF-8 character is at most 4 bytes and every token at least one byte, so the incomplete
    # character at the end of valid text lies in the last 3 tokens at most.
    MAX_SPLIT = 3
    # Pending tokens that still decode to U+FFFD at every split are invalid output: past this many
    # they are released as U+FFFD rather than held forever.
    MAX_PENDING = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._raw_decode = tokenizer._tok.decode  # the Rust call itself: this runs twice per token
        # The prompt's tail is context only: its text is not part of the output.
        self._ids: list[int] = list(prompt_ids)[-4:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        self._pieces: list[str] = []  # deltas not yet joined into _text

    def _decode(self, ids: list[int]) -> str:
        return self._raw_decode(ids, self._skip)

    def add(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; returns the text they complete (may be "" while a character is split)."""
        self._ids.extend(new_ids)
        p, r, n = self._prefix_offset, self._read_offset, len(self._ids)
        prefix_text = self._decode(self._ids[p:r])
        full_text, new_read = self._decode(self._ids[p:]), n
        if full_text.endswith(REPLACEMENT_CHAR):
            # Emit up to the latest split that leaves only a partial character pending.
            for k in range(n - 1, max(r, n - self.MAX_SPLIT) - 1, -1):
                text = self._decode(self._ids[p:k])
                if not text.endswith(REPLACEMENT_CHAR):
                    full_text, new_read = text, k
                    break
            else:
                if n - r <= self.MAX_PENDING:
                    return ""
                # Invalid bytes: release all but the last tokens, which may still start a character.
                new_read = n - self.MAX_SPLIT
                full_text = self._decode(self._ids[p:new_read])
        if new_read <= r:
            return ""
        delta = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        self._advance(r, new_read)
        if delta:
            self._pieces.append(delta)
        return delta

    def _advance(self, new_prefix: int, new_read: int) -> None:
        # Drop ids before the new window so the list does not grow with the sequence.
        del self._ids[:new_prefix]
        self._prefix_offset = 0
        self._read_offset = new_read - new_prefix

    def flush(self) -> str:
        """At the end of a sequence: release whatever is still held back, as decoded (with U+FFFD)."""
        p, r = self._prefix_offset, self._read_offset
        if r == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[p:r])
        full_text = self._decode(self._ids[p:])
        delta = full_text[len(prefix_text):]
        self._advance(r, len(self._ids))
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far (held-back bytes excluded)."""
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        return self._text
