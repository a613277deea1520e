"""What the OpenAI-compatible HTTP API adds to time to first token, against gRPC, at 16 concurrent
streams on one `mesh serve --http-port` (a subprocess), in one run.

Rounds alternate between the protocols (gRPC then HTTP, then HTTP then gRPC, ...); each round sends 16
streaming requests at once with fresh random token-id prompts (no prefix-cache hits), greedy, a fixed
output length. The clients are as thin as each protocol allows: grpc.aio's stub on one channel, and a
raw HTTP/1.1 request per kept-alive connection with a line reader of the server-sent events. TTFT = send -> the first response carrying a token. Also
checks that both protocols return the same tokens for the same prompt. Prints JSON lines: one per
protocol (TTFT median / p90, tokens/s) and the HTTP / gRPC ratio, over all requests and as the median of
each pair of back-to-back rounds (steadier on a machine that other work shares).

    .venv/bin/python bench/http_vs_grpc.py [--model DIR] [--streams 16] [--rounds 20] [--prompt-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, emit, hardware


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    """`mesh serve` on two free ports, once /health answers 200; (process, gRPC target, HTTP base)."""
    grpc_port, http_port = _free_port(), _free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    # WARNING: no access lines while timing
    cmd = [sys.executable, "-m", "mesh_cli", "serve", "--port", str(grpc_port), "--http-port", str(http_port),
           "--log-level", "WARNING", *(["--model", model] if model else []), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            _get(base + "/health")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"mesh serve did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.2)
    return proc, f"127.0.0.1:{grpc_port}", base


class Clients:
    """One gRPC channel, and one kept-alive HTTP/1.1 connection per concurrent stream, for the whole run."""

    def __init__(self, target: str, base: str, model: str, streams: int):
        import grpc
        from router_service.protos import inference_pb2_grpc as pb_grpc
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.host, self.port = base.removeprefix("http://").split(":")
        self.model = model
        self.free: asyncio.Queue = asyncio.Queue()
        self.streams = streams

    async def open(self) -> None:
        for _ in range(self.streams):
            self.free.put_nowait(await asyncio.open_connection(self.host, int(self.port)))

    async def close(self) -> None:
        await self.channel.close()
        while not self.free.empty():
            _, writer = self.free.get_nowait()
            writer.close()

    async def grpc(self, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
        from router_service.protos import inference_pb2 as pb
        t0, first, ids = time.perf_counter(), None, []
        req = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True))
        async for r in self.stub.Generate(req):
            if r.token_ids and first is None:
                first = time.perf_counter() - t0
            ids += r.token_ids
        return first, ids

    async def http(self, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
        """A raw HTTP/1.1 request and a line reader of the server-sent events: as thin as the gRPC stub,
        so that the figures compare the servers, not the client libraries."""
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "ignore_eos": True, "return_token_ids": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        reader, writer = await self.free.get()
        if reader.at_eof() or writer.is_closing():  # closed by the server after its keep-alive timeout
            writer.close()
            reader, writer = await asyncio.open_connection(self.host, int(self.port))
        t0, first, ids = time.perf_counter(), None, []
        try:
            writer.write(head + body)
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("the server closed the connection")
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    got = chunk["choices"][0].get("token_ids") if chunk["choices"] else None
                    if got and first is None:
                        first = time.perf_counter() - t0
                    ids += got or []
                elif line.startswith(b"data: [DONE]"):
                    break
            while (await reader.readline()) != b"0\r\n":  # the rest of the chunked body
                pass
            await reader.readline()
        finally:
            self.free.put_nowait((reader, writer))
        return first, ids

    async def round(self, proto: str, prompts: list[list[int]], max_tokens: int):
        one = self.grpc if proto == "grpc" else self.http
        out = await asyncio.gather(*(one(p, max_tokens) for p in prompts))
        return [t for t, _ in out], [i for _, i in out]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or Hub id (default: the built-in model)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams per round (default 16)")
    p.add_argument("--rounds", type=int, default=20, help="rounds per protocol (default 20)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per stream (default 16)")
    p.add_argument("--serve-args", default="--dtype float32", help="extra `mesh serve` flags")
    args = p.parse_args()
    proc, target, base = start_server(args.model, args.serve_args.split())
    try:
        model = json.loads(_get(base + "/v1/models"))["data"][0]["id"]
        from router_service.client import MeshClient
        with MeshClient(target) as c:
            vocab = c.model_info()["vocab_size"]
        rng = random.Random(0)

        def prompts():
            return [[rng.randrange(1, min(vocab, 4000)) for _ in range(args.prompt_tokens)]
                    for _ in range(args.streams)]
        ttft = {"grpc": [], "http": []}
        wall = {"grpc": 0.0, "http": 0.0}
        pairs = []  # per round: median HTTP TTFT / median gRPC TTFT of the rounds run back to back

        async def run() -> tuple[list, list]:
            clients = Clients(target, base, model, args.streams)
            await clients.open()
            try:
                same = prompts()[:4]  # parity: the same prompts through both protocols
                _, g_ids = await clients.round("grpc", same, args.max_tokens)
                _, h_ids = await clients.round("http", same, args.max_tokens)
                for proto in ("grpc", "http"):  # warm-up: connections open, code paths hot
                    await clients.round(proto, prompts(), args.max_tokens)
                for r in range(args.rounds):
                    medians = {}
                    # which protocol goes first alternates, so that neither always follows the other
                    for proto in (("grpc", "http") if r % 2 == 0 else ("http", "grpc")):
                        t0 = time.perf_counter()
                        times, _ = await clients.round(proto, prompts(), args.max_tokens)
                        wall[proto] += time.perf_counter() - t0
                        ttft[proto] += times
                        medians[proto] = statistics.median(times)
                    pairs.append(medians["http"] / medians["grpc"])
                return g_ids, h_ids
            finally:
                await clients.close()
        g_ids, h_ids = asyncio.run(run())
        hw = hardware()
        for proto in ("grpc", "http"):
            xs = sorted(ttft[proto])
            emit({"bench": "http_vs_grpc", "protocol": proto, "streams": args.streams, "rounds": args.rounds,
                  "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                  "ttft_ms_median": round(statistics.median(xs) * 1e3, 2),
                  "ttft_ms_p90": round(xs[int(0.9 * (len(xs) - 1))] * 1e3, 2),
                  "output_tok_s": round(args.streams * args.max_tokens * args.rounds / wall[proto], 1), **hw})
        ratio = statistics.median(ttft["http"]) / statistics.median(ttft["grpc"])
        emit({"bench": "http_vs_grpc", "ttft_ratio_http_over_grpc": round(ratio, 3),
              "ttft_ratio_paired_median": round(statistics.median(pairs), 3), "same_tokens": g_ids == h_ids,
              "model": model, "load_average": os.getloadavg()[0]})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


def _get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


if __name__ == "__main__":
    sys.exit(main())
