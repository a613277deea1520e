"""Shared fixtures: small random-weight checkpoints written by transformers itself (the reference)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3_next"]

# Where the runtime under test runs: "cpu" (CI) or "cuda" (a GPU machine). The references stay on the
# CPU in float32 either way, so a GPU run checks the CUDA path against the same transformers numbers.
DEVICE = os.environ.get("MESH_TEST_DEVICE", "cpu")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when
# a kernel is defined, so it must be set before any kernel module is imported.
if not DEVICE.startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The backends a parity test runs: the torch reference everywhere, the C kernels on the CPU, the
# Triton kernels on a GPU and, through the interpreter, on the CPU too.
BACKENDS = ["torch", "cuda"] if DEVICE.startswith("cuda") else ["torch", "cpu", "cuda"]


def pytest_configure(config):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"MESH_TEST_DEVICE={DEVICE} but torch sees no CUDA device")


def build_hf_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model with transformers' own save_pretrained (per-expert keys on disk).

    head_dim 32 and the engine's 16-token blocks are shapes the native CPU kernels take, so the
    comparisons with transformers run through them (tests that set MESH_NATIVE_KERNELS=0 cover the
    torch ops, which are also the GPU path)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=True, mlp_only_layers=[1], **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, **common)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif family == "qwen3_next":
        # layers 0-2 Gated DeltaNet, layer 3 full attention (every 4th); layer 1 a dense MLP
        cfg = tf.Qwen3NextConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1],
                                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                 linear_value_head_dim=16, linear_conv_kernel_dim=4,
                                 **{**common, "num_hidden_layers": 4})
        model = tf.Qwen3NextForCausalLM(cfg)
    else:
        cfg = tf.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(cfg)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    # HF's default init is tiny (std 0.02): scale up so logits are well separated and greedy
    # comparisons test the arithmetic, not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if family == "qwen3_next":  # zero-centred norms start at 0: make them matter
                    p.normal_(0.0, 0.3)
            elif not name.endswith(("A_log", "dt_bias")):
                p.mul_(5.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: build_hf_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def hf_models(hf_checkpoints):
    from transformers import AutoModelForCausalLM
    return {f: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for f, d in hf_checkpoints.items()}


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=None)
    return out[0, len(prompt):].tolist()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, started and stopped by the test."""

    def __init__(self, maxmemory: str = "256mb"):
        import shutil
        import subprocess
        import time as _time
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        self.client = redis.Redis(port=self.port)
        deadline = _time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if _time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                _time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_native_settings():
    """Native-kernel settings are read from the environment once per process; each test starts from
    the environment as it is now (an earlier test's monkeypatch has been undone)."""
    from mesh.model.cpu import native
    native.refresh_settings()


def native_env(monkeypatch, name: str, value: str | None) -> None:
    """Set (or with None, unset) MESH_NATIVE_KERNELS / _THREADS / _AMX / _BF16_WIDE for this test,
    effective now (MESH_NATIVE_KERNELS is read when an engine picks its backend)."""
    from mesh.model.cpu import native
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    native.refresh_settings()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny preset checkpoint, with a tokenizer.json (the gateway, CLI, chat and prefix-cache tests)."""
    from mesh.presets import init_model
    return init_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("gw") / "tiny")  # has tokenizer.json
