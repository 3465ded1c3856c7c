"""A real router (tiny MoE, experts in process) and a real batcher, both over gRPC on port 0, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from moemesh.serving import client_channel, serve_in_process
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from services.batcher.__main__ import build
from services.batcher.config import BatcherConfig
from services.batcher.engine_loop import EngineLoop
from services.batcher.servicer import BatcherServicer
from services.batcher.servicer import add_to_server as add_batcher
from services.router.__main__ import build_router
from services.router.config import RouterConfig
from services.router.servicer import add_to_server as add_router


class RecordingRouter:
    """The real router client, with a log of what the engine loop asked it: ("step", ids), ("release", ids); the
    mesh also logs ("cancel", id) when the loop is told to cancel."""

    def __init__(self, client, log: list) -> None:
        self.client, self.log, self.address = client, log, client.address

    async def info(self):
        return await self.client.info()

    async def step(self, plan):
        if plan.release:  # releases travel in the step request, ahead of its work
            self.log.append(("release", list(plan.release)))
        self.log.append(("step", [i.seq.seq_id for i in plan.items]))
        return await self.client.step(plan)

    async def release(self, seq_ids):
        self.log.append(("release", list(seq_ids)))
        return await self.client.release(seq_ids)


@dataclass
class Mesh:
    batcher: batcher_pb2_grpc.BatcherStub
    router: router_pb2_grpc.RouterStub
    loop: EngineLoop
    model: str
    router_address: str
    log: list = field(default_factory=list)

    async def router_info(self) -> router_pb2.RouterInfo:
        return await self.router.Info(router_pb2.RouterInfoRequest())

    async def generate(self, prompt: list[int], max_tokens: int = 4, tenant: str = "t", **kw) -> "Result":
        """Runs one Generate to the end; times in seconds since the call."""
        request = request_for(prompt, max_tokens, tenant, **kw)
        start, result = time.perf_counter(), Result()
        async for event in self.batcher.Generate(request):
            now = time.perf_counter() - start
            if event.token_ids and result.ttft is None:
                result.ttft = now
            result.tokens += list(event.token_ids)
            result.events.append(event)
        result.total = time.perf_counter() - start
        return result


@dataclass
class Result:
    ttft: float | None = None
    total: float = 0.0
    tokens: list[int] = field(default_factory=list)
    events: list = field(default_factory=list)


def request_for(prompt: list[int], max_tokens: int, tenant: str, **kw) -> batcher_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True))
    return batcher_pb2.GenerateRequest(request_id=kw.pop("request_id", f"req-{uuid.uuid4().hex[:12]}"),
                                       tenant=tenant, prompt_ids=prompt, sampling=sampling, **kw)


@contextlib.asynccontextmanager
async def mesh(model_dir, kv_blocks: int = 64, block_size: int = 16, **knobs) -> AsyncIterator[Mesh]:
    rconf = RouterConfig(model=str(model_dir), port=0, metrics_port=-1, kv_blocks=kv_blocks, block_size=block_size)
    router = await asyncio.to_thread(build_router, rconf)
    try:
        async with serve_in_process(lambda s: add_router(router.servicer, s), name="router") as r:
            knobs.setdefault("max_wait_ms", 5.0)
            bconf = BatcherConfig(port=0, metrics_port=-1, router_addr=r.address, **knobs)
            loop, client = build(bconf)
            log: list = []
            loop.router = RecordingRouter(client, log)
            cancel = loop.cancel
            loop.cancel = lambda seq_id: (log.append(("cancel", seq_id)), cancel(seq_id))[1]
            loop.start()
            async with serve_in_process(lambda s: add_batcher(BatcherServicer(loop), s), name="batcher") as b:
                bch, rch = client_channel(b.address), client_channel(r.address)
                stubs = batcher_pb2_grpc.BatcherStub(bch), router_pb2_grpc.RouterStub(rch)
                yield Mesh(*stubs, loop, str(model_dir), r.address, log)
                await bch.close()
                await rch.close()
            await loop.stop()
            await client.close()
    finally:
        router.close()


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
