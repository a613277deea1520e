"""Shared fixtures: small random-weight checkpoints written by transformers itself (the reference)."""

from __future__ import annotations

import logging
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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: on a CPU run they are skipped, with the reason in the summary
    (-rs), never passed without running; with MESH_TEST_DEVICE=cuda they run (or fail)."""
    if DEVICE.startswith("cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run with MESH_TEST_DEVICE=cuda on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def build_hf_checkpoint(family: str, out: Path, seed: int = 0, num_experts: int = 8, **overrides) -> Path:
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
        cfg = tf.Qwen3MoeConfig(num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=True, mlp_only_layers=[1], **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, **common)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif family == "qwen3_next":
        # layers 0-2 Gated DeltaNet, layer 3 full attention (every 4th); layer 1 a dense MLP
        cfg = tf.Qwen3NextConfig(num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1],
                                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                 linear_value_head_dim=16, linear_conv_kernel_dim=4,
                                 **{**common, "num_hidden_layers": 4})
        model = tf.Qwen3NextForCausalLM(cfg)
    else:
        cfg = tf.MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=2, **common)
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


def _unused_port() -> int:
    """A loopback port nothing listens on now, for a server that cannot bind port 0 itself (the
    caller retries on a collision)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, started and stopped by the test.

    redis-server cannot bind port 0 and say which port it got, so a port is picked and, should
    another process take it before redis binds it, redis exits and the start is retried on another."""

    def __init__(self, maxmemory: str = "256mb", attempts: int = 5):
        import shutil
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs it)")
        self.exe, self.maxmemory = exe, maxmemory
        for _ in range(attempts):
            self.port = _unused_port()
            if self.start():
                break
        else:
            raise RuntimeError(f"redis-server did not start in {attempts} attempts")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> bool:
        """Start (or restart) redis on self.port, loopback only; False when it exited (port taken)."""
        import subprocess
        import time as _time

        import redis
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)
        deadline = _time.monotonic() + timeout
        while True:
            try:
                self.client.ping()
                return True
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    return False
                if _time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not answer a ping in time")
                _time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset checkpoint, with a tokenizer.json (the gateway, CLI, chat and prefix-cache tests)."""
    from mesh.presets import init_model
    return init_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("tiny") / "tiny")  # has tokenizer.json



class MeshServe:
    """`python -m mesh_cli serve --port 0 ARGS` in a session of its own, its log in `dir/serve.log` (a
    file: access lines from many requests would fill a pipe). Returns once it is SERVING; `port` is
    the port it bound and logged itself (none picked here and reused)."""

    def __init__(self, dir: Path, *args: str, admin_token: str | None = None, timeout: float = 150.0):
        import re
        import subprocess
        import time

        from router_service.client import MeshClient, MeshError
        self.dir, self.log_path = Path(dir), Path(dir) / "serve.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--port", "0", *args],
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        self.port = None
        while self.port is None:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mesh serve did not start listening:\n{self.log()}")
            else:
                time.sleep(0.2)
        self.target = f"127.0.0.1:{self.port}"
        self.client = MeshClient(self.target, timeout=120, admin_token=admin_token)
        while True:
            try:
                if self.client.health(timeout=2) == "SERVING":
                    break
            except MeshError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mesh serve did not become SERVING:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; fails the test if it does not exit within `timeout`. Returns the exit code."""
        import signal
        import subprocess
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("mesh serve did not stop on SIGTERM")
        self._log.close()
        return self.proc.returncode


ADMIN_TOKEN = "s3cret-admin-token"


def pool_checkpoint(d: Path) -> tuple[Path, Path]:
    """The 7-expert checkpoint the expert-pool tests serve (no worker count divides it) and a file
    holding ADMIN_TOKEN, both under `d`."""
    model = build_hf_checkpoint("qwen3_moe", d / "qwen3_moe_7", seed=3, num_experts=7)
    (d / "token").write_text(ADMIN_TOKEN + "\n")
    return model, d / "token"


def watch_health(target: str, stop, health: list):
    """A started daemon thread that appends the gateway's health to `health` every 0.2 s until `stop`."""
    import threading
    import time

    from router_service.client import MeshClient

    def watch():
        c = MeshClient(target, timeout=10)
        while not stop.is_set():
            health.append(c.health(timeout=5))
            time.sleep(0.2)
        c.close()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def engine_factory(model_dir, **config):
    """What a Gateway builds its engine with: the model in float32 with a small KV pool (4 MiB),
    `config` overriding EngineConfig fields."""
    from mesh.config import EngineConfig
    from mesh.engine.engine import Engine
    kw = {"dtype": "float32", "kv_cache_memory": 4 << 20, **config}
    return lambda: Engine(model_dir, EngineConfig(**kw))


class LogCapture(logging.Handler):
    """Every log record, for tests that check what the server logged (tracebacks above all)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [self.format(r) for r in self.records if r.exc_info or "Traceback" in r.getMessage()]


class LiveGateway:
    """A Gateway on a free loopback port, its event loop in a background thread."""

    def __init__(self, engine_factory, load=True, **kw):
        import asyncio
        import threading

        from router_service.server import Gateway
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gw = Gateway(engine_factory, "127.0.0.1", 0, **kw)
        self.call(self.gw.start())
        self.target = f"127.0.0.1:{self.gw.port}"
        self.loading = asyncio.run_coroutine_threadsafe(self.gw.load(), self.loop)
        if load:
            self.loading.result(60)

    def call(self, coro, timeout=60):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self):
        return self.gw.aengine.stats()

    def wait_idle(self, timeout=10.0):
        """Until no request is in flight and every KV block is back (the engine's own count)."""
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s["in_flight"] == 0 and s["blocks_used"] == 0 and self.gw.engine.blocks.num_used == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"requests or KV blocks not freed: {self.stats()}")

    def close(self):
        self.call(self.gw.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class SlowEngine:
    """Any object with the Engine's interface serves; this one takes 5 ms a step (timing-proof drain)."""

    def __init__(self, engine, delay=0.005):
        self._e, self._delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._e, name)

    def step(self):
        import time
        time.sleep(self._delay)
        return self._e.step()


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


# --- an independent sampling reference (numpy, written from the definitions, not from the sampler) ---

def reference_sampling_probs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """The distribution a sampler should draw from, as float64 numpy: softmax(logits / T), restricted
    to the top_k likeliest tokens (0: all), renormalised, then to the smallest set of likeliest tokens
    whose mass reaches top_p (the first always kept), renormalised."""
    import numpy as np
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = order[:top_k] if top_k > 0 else order
    kept = {i: p[i] for i in keep}
    total = sum(kept.values())
    out = np.zeros(len(p))
    mass = 0.0
    for i in keep:
        if mass >= top_p and out.any():
            break
        out[i] = kept[i] / total
        mass += out[i]
    return out / out.sum()


def chi_square_critical(df: int, alpha: float = 1e-6) -> float:
    """The upper alpha quantile of the chi-square distribution (the Wilson-Hilferty approximation,
    within a few percent of the exact value for small df and closer as df grows), with the normal
    quantile found by bisection on erfc (scipy is not a dependency)."""
    import math
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    z = lo
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches_distribution(draws, probs, alpha: float = 1e-6) -> None:
    """Every draw lies in the support of `probs`, every token of the support with an expected count
    of 5 or more is drawn, and Pearson's chi-square over the support (tokens with expected counts
    under 5 pooled) stays under the alpha critical value."""
    import numpy as np
    probs = np.asarray(probs, dtype=np.float64)
    counts = np.bincount(np.asarray(draws, dtype=np.int64), minlength=len(probs)).astype(np.float64)
    n = counts.sum()
    outside = [int(t) for t in np.nonzero((probs == 0) & (counts > 0))[0]]
    assert not outside, f"drew tokens {outside} that have no mass in the reference distribution"
    expected = probs * n
    big = expected >= 5
    assert all(counts[big] > 0), f"tokens {np.nonzero(big & (counts == 0))[0].tolist()} never drawn"
    obs = list(counts[big])
    exp = list(expected[big])
    small = (~big) & (probs > 0)
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = max(1, len(obs) - 1)
    crit = chi_square_critical(df, alpha)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f} (df {df}): observed {obs} expected {exp}"
