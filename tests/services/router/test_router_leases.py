"""KV leases: a sequence no batcher steps any more (its batcher died) has its KV blocks freed by the router after
the lease; live sequences keep theirs; Info carries a per-process instance id."""

from __future__ import annotations

import asyncio

import pytest

from moemesh.serving import client_channel, serve_in_process
from moemesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.router.__main__ import build_router
from services.router.config import RouterConfig
from services.router.leases import SequenceLeases
from services.router.servicer import add_to_server

PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28, 198, 4161, 2]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_leases_expire_untouched_sequences_once():
    clock = Clock()
    leases = SequenceLeases(10.0, clock)
    leases.touch(["a", "b"])
    clock.now = 6.0
    leases.touch(["b"])
    leases.forget(["c"])  # unknown: ignored
    clock.now = 10.5
    assert leases.expired() == ["a"]
    assert leases.expired() == []
    clock.now = 16.5
    assert leases.expired() == ["b"]
    assert len(leases) == 0


def test_lease_must_be_positive():
    with pytest.raises(ValueError, match="ttl: 0"):
        SequenceLeases(0)


def work(seq_id: str, tokens: list[int], position: int) -> router_pb2.SequenceWork:
    return router_pb2.SequenceWork(seq_id=seq_id, token_ids=tokens, position=position, sample=True,
                                   sampling=common_pb2.SamplingParams(max_tokens=8))


async def test_router_frees_the_kv_of_sequences_nobody_steps(tiny_moe_dir):
    config = RouterConfig(model=str(tiny_moe_dir), port=0, metrics_port=-1, kv_blocks=16, block_size=16,
                          seq_lease=0.4)
    router = await asyncio.to_thread(build_router, config)
    try:
        async with serve_in_process(lambda s: add_to_server(router.servicer, s), name="router") as running:
            router.servicer.start_sweeper()
            channel = client_channel(running.address)
            stub = router_pb2_grpc.RouterStub(channel)
            info = await stub.Info(router_pb2.RouterInfoRequest())
            assert len(info.instance_id) == 32 and info.kv_blocks_free == 16
            await stub.Step(router_pb2.StepRequest(step_id=1, work=[work("dead", PROMPT, 0), work("live", PROMPT, 0)]))
            position = len(PROMPT)
            for step in range(2, 12):  # "live" keeps being stepped past the lease; "dead" does not
                r = await stub.Step(router_pb2.StepRequest(step_id=step, work=[work("live", [5], position)]))
                position += 1
                await asyncio.sleep(0.1)
            info = await stub.Info(router_pb2.RouterInfoRequest())
            assert info.active_sequences == 1
            assert info.kv_blocks_free == 16 - 2 == r.kv_blocks_free  # "live": 21 tokens in 2 blocks
            await channel.close()
    finally:
        router.close()
