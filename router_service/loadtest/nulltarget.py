"""A trivially fast mesh.v1.Inference server: Generate answers at once with `--tokens` responses of
one token each (no model). It measures the load generator, not a server: how many requests/s the
generator issues before it becomes the bottleneck.

    python -m router_service.loadtest.nulltarget --port 50099 [--tokens 1]
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from router_service.protos import inference_pb2 as pb
from router_service.protos import inference_pb2_grpc as pb_grpc


class NullInference(pb_grpc.InferenceServicer):
    def __init__(self, tokens: int = 1):
        self.tokens, self.served = tokens, 0

    async def Generate(self, request, context):
        n = max(1, min(self.tokens, request.sampling.max_tokens or self.tokens))
        plen = len(request.prompt_token_ids) or 1
        for i in range(n):
            last = i == n - 1
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[0],
                                      finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED,
                                      usage=pb.Usage(prompt_tokens=plen, completion_tokens=i + 1))
        self.served += 1

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(architecture="null", family="null", vocab_size=1000, num_layers=1, num_experts=1,
                            top_k=1, max_model_len=1 << 20, block_size=16, num_kv_blocks=1 << 16,
                            max_queued_requests=1 << 30, model="")

    async def GetServerStats(self, request, context):
        return pb.ServerStats(steps=self.served, max_num_seqs=1 << 20, max_num_batched_tokens=1 << 20)


async def start(port: int = 0, tokens: int = 1) -> tuple[grpc.aio.Server, int]:
    """Start a null server on 127.0.0.1 in the running loop; stop it with `await server.stop(0)`."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(NullInference(tokens), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def serve(port: int, tokens: int = 1) -> None:
    server, port = await start(port, tokens)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick one; printed)")
    ap.add_argument("--tokens", type=int, default=1, help="responses (tokens) per request (default 1)")
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.tokens))


if __name__ == "__main__":
    main()
