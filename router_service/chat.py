"""Chat prompts: a model's chat template rendered with jinja2 the way transformers'
`apply_chat_template` renders it, so a chat request gives the model the same tokens here as there.

Where the template comes from (transformers' order): `chat_template.jinja` in the model directory,
else the `chat_template` of `tokenizer_config.json` (a string, or a list of named templates, of which
"default" is used). The environment matches transformers': a sandbox (templates come with
checkpoints, which are not trusted code), `trim_blocks` and `lstrip_blocks`, the loop-controls
extension, `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that keeps
non-ASCII characters. The template sees `messages`, `add_generation_prompt`, `tools` and the special
tokens named in tokenizer_config.json (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mesh.types import InvalidRequest

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(InvalidRequest):
    """The template could not render these messages (it raised, or they are not what it expects)."""


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the model's chat template does not parse: {e}") from None
        self.special_tokens = special_tokens

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The model directory's chat template, or None when it has none. Raises ValueError for a
        template that does not parse."""
        d = Path(model_dir)
        try:
            config = json.loads((d / "tokenizer_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        source = None
        if (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text()
        else:
            source = config.get("chat_template")
            if isinstance(source, list):
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        special = {k: t for k in _SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
               **extra) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...], content a string)."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **self.special_tokens, **extra)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template failed on these messages: {e}") from None
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise TemplateError(f"the model's chat template failed on these messages: "
                                f"{type(e).__name__}: {e}") from None
