"""Tokenizer wrapper and streaming detokenizer over a real trained byte-level BPE."""

from __future__ import annotations

import inspect
import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import mesh.config
from mesh.presets import SPECIAL_TOKENS, init_model
from mesh.tokenizer import IncrementalDetokenizer, Tokenizer

UNICODE_TEXT = "héllo wörld ∑ 🚀 中文 — naïve café ✓ 😀👍🏽\n\tdef f(): return 'ok'"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        # vocab 512: few merges, so multi-byte characters are split over several tokens
        yield init_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("tok") / "m")


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def test_from_dir_without_tokenizer_json_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_python_source_round_trips_exactly(tok):
    source = inspect.getsource(mesh.config) + "\r\n  trailing spaces   \n\n\x00\x7f"
    ids = tok.encode(source)
    assert tok.decode(ids) == source
    assert len(ids) < len(source.encode()) / 1.5  # the merges learned something about Python
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_special_tokens_are_single_ids(tok):
    for t in SPECIAL_TOKENS:
        i = tok.token_id(t)
        assert i is not None and tok.encode(t) == [i]
        assert tok.decode([i], skip_special_tokens=False) == t
        assert tok.decode([i]) == ""
    assert tok.vocab_size == 512
    assert tok.token_id("<|no_such_token|>") is None
    assert set(tok.eos_token_ids) == {tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")}
    assert tok.eos_token_ids[0] == tok.token_id("<|endoftext|>")  # named by the configs, so first


def test_eos_comes_from_the_configs(model_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|fim_pad|>"}}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token_ids[:3] == (7, 9, t.token_id("<|fim_pad|>"))


def test_fim_prompt(tok):
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    ids = tok.fim_prompt(prefix, suffix)
    p, s, m = (tok.token_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert ids == [p, *tok.encode(prefix), s, *tok.encode(suffix), m]
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def test_fim_prompt_without_fim_tokens_raises():
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["def f(x): return x"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = Tokenizer(raw)
    with pytest.raises(ValueError, match="fim_prefix"):
        t.fim_prompt("a", "b")


def test_incremental_one_token_at_a_time(tok):
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) > len(UNICODE_TEXT)  # multi-byte characters really are split over tokens
    d = IncrementalDetokenizer(tok)
    deltas = [d.add([i]) for i in ids]
    assert "".join(deltas) == d.text == tok.decode(ids) == UNICODE_TEXT
    assert "" in deltas  # some steps held back half a character
    assert all("\ufffd" not in x for x in deltas)
    assert d.flush() == ""


def test_incremental_random_chunks_and_specials(tok):
    eot = tok.token_id("<|endoftext|>")
    ids = tok.encode(UNICODE_TEXT) + [eot] + tok.encode("x = '🚀'\n") + [eot]
    rng = random.Random(0)
    for skip in (True, False):
        d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        out, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 5)
            out.append(d.add(ids[i:i + n]))
            i += n
        assert "".join(out) == d.text == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_after_a_prompt(tok):
    prompt = tok.encode("print('中")  # the prompt's text is context, not output
    gen = tok.encode("文 ok')\n")
    d = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(d.add([i]) for i in gen) == tok.decode(gen)


def test_invalid_bytes_are_released_not_held_forever(tok):
    euro = tok.encode("€")  # E2 82 AC, one byte per token at this vocab size
    assert len(euro) == 3
    garbage = [euro[1]] * 20  # lone continuation bytes never complete a character
    d = IncrementalDetokenizer(tok)
    out = [d.add([i]) for i in garbage]
    assert d.text  # released before the end of the stream
    assert len(d._ids) <= IncrementalDetokenizer.MAX_PENDING + 4  # the window stays bounded
    out.append(d.flush())
    out += [d.add([i]) for i in euro]
    assert "".join(out) == d.text == tok.decode(garbage + euro)


def test_a_real_replacement_character_is_not_lost(tok):
    text = "bad byte: \ufffd, again \ufffd"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    out = [d.add([i]) for i in ids]
    out.append(d.flush())  # the stream ends on U+FFFD: flush releases what was held for it
    assert "".join(out) == d.text == text
