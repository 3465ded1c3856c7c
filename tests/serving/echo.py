"""A small servicer for exercising the plumbing over real sockets: the Tokenizer and Batcher contracts with
behaviour chosen by the request (Decode's ids pick an exception to raise; Generate streams slowly)."""

from __future__ import annotations

import asyncio

import grpc

from moemesh.errors import ErrorStatus
from moemesh.serving import ServiceError
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

TOKENIZER = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
BATCHER = batcher_pb2.DESCRIPTOR.services_by_name["Batcher"].full_name


class Quota(ServiceError):
    status = ErrorStatus.RESOURCE_EXHAUSTED


# Decode(model=<key>) raises this exception.
FAILURES: dict[str, Exception] = {
    "value": ValueError("max_tokens: -1 is negative"),
    "key": KeyError("model 'nope' is not served"),
    "lookup": LookupError("no such sequence"),
    "permission": PermissionError("tenant 'a' may not use model 'b'"),
    "timeout": TimeoutError("queue wait exceeded 5s"),
    "domain": Quota("tenant over quota", retry_after_ms=1500),
    "bug": RuntimeError("boom"),
    "unimplemented": NotImplementedError("external payloads"),
}


class EchoTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    async def Decode(self, request, context):
        if request.model in FAILURES:
            raise FAILURES[request.model]
        return tokenizer_pb2.DecodeResponse(text=",".join(map(str, request.ids)))

    async def DetokenizeStream(self, request_iterator, context):
        async for request in request_iterator:
            if request.model == "bug":
                raise RuntimeError("stream boom")
            yield tokenizer_pb2.DetokenizeResponse(text="".join(map(str, request.ids)))


class SlowBatcher(batcher_pb2_grpc.BatcherServicer):
    """Generate yields one event per prompt id, `delay` seconds apart; a prompt id of 0 raises after that event."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.started = asyncio.Event()

    async def Generate(self, request, context):
        self.started.set()
        for i, token in enumerate(request.prompt_ids):
            await asyncio.sleep(self.delay)
            yield batcher_pb2.GenerateEvent(token_ids=[token], completion_tokens=i + 1)
            if token == 0:
                raise ValueError("prompt_ids: 0 is not allowed")

    async def Stats(self, request, context):
        return batcher_pb2.BatcherStats(max_batch_size=8)


def register_echo(batcher: SlowBatcher | None = None):
    def register(server: grpc.aio.Server) -> list[str]:
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(EchoTokenizer(), server)
        batcher_pb2_grpc.add_BatcherServicer_to_server(batcher or SlowBatcher(), server)
        return [TOKENIZER, BATCHER]

    return register
