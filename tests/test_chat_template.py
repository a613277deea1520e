"""Chat templates rendered by router_service.chat give the same text as transformers'
apply_chat_template (the reference) on the same model directory: the built-in ChatML template and a
template using what real checkpoints' templates use (loop controls, raise_exception, tojson with
non-ASCII text, the tokenizer's special tokens, a system default)."""

from __future__ import annotations

import json
import shutil

import pytest

from router_service.chat import ChatTemplate, TemplateError

RICH = """{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}
{%- else %}{%- set system = 'You are a helpful coding assistant.' %}{%- set rest = messages %}{%- endif %}
{{- bos_token if bos_token else '' }}<|im_start|>system
{{ system }}{% if tools %}
Tools: {{ tools | tojson }}{% endif %}<|im_end|>
{% for m in rest %}
  {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}
  {%- if m['content'] == 'STOP' %}{% break %}{% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}{{ eos_token if loop.last and m['role'] == 'assistant' else '' }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Write fizzbuzz."}],
    [{"role": "system", "content": "Réponds en français ✓"}, {"role": "user", "content": "  trie une liste  "},
     {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "et à l'envers ?"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "STOP"}, {"role": "user", "content": "never"}],
]


@pytest.fixture(scope="module")
def rich_dir(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat") / "rich"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(chat_template=RICH, bos_token=None, eos_token="<|endoftext|>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("which", ["tiny", "rich"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_renders_as_transformers_does(which, conversation, tiny_dir, rich_dir):
    from transformers import AutoTokenizer
    d = tiny_dir if which == "tiny" else rich_dir
    messages = CONVERSATIONS[conversation]
    tools = [{"name": "run", "description": "exécute"}] if which == "rich" else None
    for gen in (True, False):
        want = AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tools=tools, tokenize=False,
                                                                    add_generation_prompt=gen)
        assert ChatTemplate.from_dir(d).render(messages, add_generation_prompt=gen, tools=tools) == want


def test_template_file_wins_and_errors_are_clear(rich_dir, tmp_path):
    with pytest.raises(TemplateError, match="unknown role: tool"):
        ChatTemplate.from_dir(rich_dir).render([{"role": "tool", "content": "x"}])
    d = tmp_path / "m"
    shutil.copytree(rich_dir, d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert ChatTemplate.from_dir(d).render([{"role": "user", "content": "hi"}]) == "[hi]"
    (d / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate.from_dir(d)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatTemplate.from_dir(d) is None
