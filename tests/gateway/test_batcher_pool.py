"""The gateway's batcher pool: the picker's choices (no sockets), then PooledBatcher over two Batcher servers on real
sockets and an address where nothing listens (the scripted batcher of gateway_harness.py speaks the real contract)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.batcher_pool import BatcherPicker, PooledBatcher
from gateway.config import GatewayConfig
from gateway.events import GenerateParams
from gateway.upstream import BatcherClient, PeerLost
from gateway_harness import ScriptedBatcher
from mesh_process import free_port
from moemesh.runtime.types import SamplingParams
from moemesh.serving import client_channel, serve_in_process
from moemesh.serving.config import ConfigError
from moemesh.v1 import batcher_pb2_grpc


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_picker_prefers_fewest_outstanding_and_rotates_ties():
    picker = BatcherPicker(["a", "b", "c"])
    picks = []
    for _ in range(6):
        name = picker.pick()
        picker.acquire(name)
        picks.append(name)
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    picker.release("b")
    picker.release("b")
    assert picker.pick() == "b"  # now the least loaded
    assert picker.pick(exclude={"b"}) in ("a", "c")


def test_picker_skips_a_down_batcher_until_its_time_is_up():
    clock = Clock()
    picker = BatcherPicker(["a", "b"], clock=clock, down_s=5.0)
    picker.acquire("b")
    picker.acquire("b")
    picker.mark_down("a")
    assert picker.pick() == "b"  # busier, but a is down
    clock.now += 5.0
    assert picker.pick() == "a"  # tried again once the down time passed
    picker.mark_down("b")
    clock.now += 1.0
    picker.mark_down("a")
    assert picker.pick() == "b"  # all down: the one that failed longest ago
    assert picker.pick(exclude={"a", "b"}) is None


def test_picker_refuses_bad_lists_and_unbalanced_release():
    with pytest.raises(ValueError, match="empty"):
        BatcherPicker([])
    with pytest.raises(ValueError, match="twice"):
        BatcherPicker(["a", "a"])
    with pytest.raises(RuntimeError, match="released more"):
        BatcherPicker(["a"]).release("a")


def test_config_splits_and_checks_batcher_addresses():
    config = GatewayConfig.from_args(["--no-auth", "--batcher-addr", "127.0.0.1:1, 127.0.0.1:2"])
    assert config.batcher_addrs == ("127.0.0.1:1", "127.0.0.1:2")
    with pytest.raises(ConfigError, match="'nope'"):
        GatewayConfig.from_args(["--no-auth", "--batcher-addr", "127.0.0.1:1,nope"])
    with pytest.raises(ConfigError, match="twice"):
        GatewayConfig.from_args(["--no-auth", "--batcher-addr", "127.0.0.1:1,127.0.0.1:1"])


def _params(i: int) -> GenerateParams:
    return GenerateParams(f"r{i}", "default", "tiny", (1, 2, 3), SamplingParams(max_tokens=8))


async def _tokens(generation) -> list[int]:
    try:
        return [t for event in [e async for e in generation.events()] for t in event.token_ids]
    finally:
        generation.cancel()


@pytest.fixture
async def two_batchers():
    scripted = [ScriptedBatcher(script=[11, 12], delay=0.05), ScriptedBatcher(script=[21, 22], delay=0.05)]
    servers = []
    for batcher in scripted:
        def register(server, batcher=batcher):
            batcher_pb2_grpc.add_BatcherServicer_to_server(batcher, server)
            return ["moemesh.v1.Batcher"]
        servers.append(serve_in_process(register, name="batcher"))
    running = [await s.__aenter__() for s in servers]
    yield scripted, [r.address for r in running], servers
    for s in servers:
        await s.__aexit__(None, None, None)


async def test_pool_spreads_streams_and_moves_unadmitted_requests_off_a_dead_batcher(two_batchers):
    scripted, addresses, _ = two_batchers
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: UNAVAILABLE before any event
    channels = {a: client_channel(a) for a in [dead, *addresses]}
    pool = PooledBatcher({a: BatcherClient(c) for a, c in channels.items()})
    try:
        results = await asyncio.gather(*(_tokens(pool.generate(_params(i), 10)) for i in range(6)))
        for tokens in results:  # each stream came whole from one batcher (no mix of 1x and 2x ids)
            assert tokens in ([11, 12, 2], [21, 22, 2])
        assert len(scripted[0].requests) + len(scripted[1].requests) == 6
        assert scripted[0].requests and scripted[1].requests  # both served
        assert pool.picker.is_down(dead)
        assert pool.picker.outstanding == {a: 0 for a in channels}  # every stream released
    finally:
        for c in channels.values():
            await c.close()


async def test_pool_does_not_move_an_admitted_stream(two_batchers):
    scripted, addresses, servers = two_batchers
    for batcher in scripted:
        batcher.fail_after = 1  # the batcher fails after one streamed token: not re-run elsewhere
    channels = {a: client_channel(a) for a in addresses}
    pool = PooledBatcher({a: BatcherClient(c) for a, c in channels.items()})
    try:
        generation = pool.generate(_params(0), 10)
        with pytest.raises(grpc.aio.AioRpcError):
            await _tokens(generation)
        assert len(scripted[0].requests) + len(scripted[1].requests) == 1
        # All batchers gone: the request fails (UNAVAILABLE) after trying each once.
        for s in servers:
            await s.__aexit__(None, None, None)
        with pytest.raises(PeerLost):
            await _tokens(pool.generate(_params(1), 10))
        servers.clear()
    finally:
        for c in channels.values():
            await c.close()
