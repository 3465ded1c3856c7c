"""A real batcher in front of a real router (tiny MoE) that dies mid-stream: the batcher re-queues its running
sequences and recomputes them on the router that comes back (same greedy tokens as an undisturbed run), or ends them
UNAVAILABLE when the router does not come back before the request's deadline."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import grpc
import pytest

from moemesh.serving import client_channel, serve_in_process
from moemesh.serving.config import ServiceConfig
from moemesh.v1 import batcher_pb2_grpc, common_pb2
from services.batcher.__main__ import build
from services.batcher.config import BatcherConfig
from services.batcher.servicer import BatcherServicer
from services.batcher.servicer import add_to_server as add_batcher
from services.router.__main__ import build_router
from services.router.config import RouterConfig
from services.router.servicer import add_to_server as add_router
from tests.services.batcher.mesh import request_for

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28]


@contextlib.asynccontextmanager
async def router_on(model_dir, port: int):
    router = await asyncio.to_thread(build_router, RouterConfig(model=str(model_dir), port=port, metrics_port=-1,
                                                                 kv_blocks=64, block_size=16))
    try:
        async with serve_in_process(lambda s: add_router(router.servicer, s), name="router",
                                    config=ServiceConfig(port=port, metrics_port=-1)) as running:
            yield router, running
    finally:
        router.close()


@contextlib.asynccontextmanager
async def batcher_for(port: int):
    loop, client = build(BatcherConfig(port=0, metrics_port=-1, router_addr=f"127.0.0.1:{port}", max_wait_ms=5.0,
                                       router_wait=20.0))
    loop.start()
    async with serve_in_process(lambda s: add_batcher(BatcherServicer(loop), s), name="batcher") as b:
        channel = client_channel(b.address)
        yield batcher_pb2_grpc.BatcherStub(channel)
        await channel.close()
    await loop.stop()
    await client.close()


async def tokens_of(call) -> list[int]:
    return [t async for e in call for t in e.token_ids]


async def test_router_restart_mid_stream_recomputes_to_the_same_tokens(tiny_moe_dir):
    port = free_port()
    async with router_on(tiny_moe_dir, port) as (router, running), batcher_for(port) as batcher:
        expected = await tokens_of(batcher.Generate(request_for(PROMPT, 24, "t")))
        call = batcher.Generate(request_for(PROMPT, 24, "t"))
        seen: list[int] = []
        async for event in call:  # a few tokens, then the router dies under the stream
            seen += event.token_ids
            if len(seen) >= 4:
                break
        await running.stop(0)
        router.close()
        async with router_on(tiny_moe_dir, port):  # a new instance: empty KV cache
            seen += await tokens_of(call)
    assert seen == expected


async def test_router_gone_past_the_deadline_ends_the_stream_unavailable(tiny_moe_dir):
    port = free_port()
    deadline_ms = lambda: int((time.time() + 3) * 1000)  # noqa: E731
    async with batcher_for(port) as batcher:
        async with router_on(tiny_moe_dir, port) as (router, running):
            started_call = batcher.Generate(request_for(PROMPT, 200, "t", deadline_unix_ms=deadline_ms()))
            async for _ in started_call:
                break
            await running.stop(0)
        queued = batcher.Generate(request_for(PROMPT, 4, "t", deadline_unix_ms=deadline_ms()))
        started = time.monotonic()
        events = [e async for e in started_call]  # after its first token: the ending is in-band
        assert events[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        with pytest.raises(grpc.aio.AioRpcError) as err:  # before any token: the status itself
            await tokens_of(queued)
        assert time.monotonic() - started < 8
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "router is unavailable" in err.value.details()
