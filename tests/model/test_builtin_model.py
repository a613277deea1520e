"""The built-in model (mesh/builtin/): shipped as package data, a size git handles, loaded the same by
transformers (the reference) and the engine, the default of `mesh generate`, and the completion the
README shows is the one it gives."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from mesh.cli import default_model_dir
from mesh.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = default_model_dir()
PROMPT = "def fibonacci(n):"


def test_builtin_model_is_package_data_of_a_size_git_handles():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mesh"]
    files = sorted(p for p in BUILTIN.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                       "generation_config.json", "training_info.json", "README.md"}
    for p in files:
        rel = p.relative_to(ROOT / "mesh").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data: a wheel would lack it"
    assert sum(p.stat().st_size for p in files) < 40 << 20
    info = json.loads((BUILTIN / "training_info.json").read_text())
    # trained, not random: a uniform guess over 4,096 tokens is ln(4096) = 8.3 nats
    assert info["held_out_loss"] < 4.0 and info["held_out_files"] > 0


def test_transformers_and_the_engine_generate_the_same_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(BUILTIN)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN, dtype=torch.float32).eval()
    ids = tok(PROMPT + "\n", add_special_tokens=False).input_ids
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(BUILTIN, EngineConfig(dtype="float32", kv_cache_memory=16 << 20))
    (got,) = engine.generate([engine.make_request(prompt=PROMPT + "\n", sampling=SamplingParams(
        max_tokens=24, temperature=0))])
    assert got.token_ids == want[:len(got.token_ids)] and len(got.token_ids) >= 8


def test_mesh_generate_defaults_to_it_and_the_readme_shows_what_it_writes():
    out = subprocess.run([sys.executable, "-m", "mesh_cli", "generate", "--prompt", PROMPT, "--dtype", "float32",
                          "--kv-cache-memory", "64M", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    text = json.loads(out.stdout)["text"]
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("```python\n" + PROMPT, 1)[1].split("```", 1)[0]
    assert shown.strip() and text.startswith(shown.rstrip("\n")), (shown, text)
