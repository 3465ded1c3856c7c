"""The torch.distributed (gloo) expert data plane with real shard processes (tiny MoE): the logits of the in-process
engine, the transport in Router.Info, a SIGKILLed shard failing the step within 1 s with UNAVAILABLE and the router
re-forming the group when a new shard comes up, a stopped shard failing on its missing heartbeat, JoinGroup refusals.
(The shard processes and router config are the shared-memory test's, with --expert-transport dist.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch

from moemesh.errors import ErrorStatus
from moemesh.runtime.engine import Engine
from moemesh.serving import client_channel, serve_in_process
from moemesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from services.expert import servicer as expert_servicer
from services.expert.__main__ import build_servicer
from services.expert.config import ExpertConfig
from services.router.__main__ import build_router
from services.router.dist_link import DistGroup
from services.router.expert_client import ExpertCallError, GrpcShardClient
from services.router.servicer import add_to_server
from tests.services.router.test_shm_transport import (  # noqa: F401 (shards: the fixture)
    _step_until_ok, BLOCK, config, KV_BLOCKS, PROMPT, shards)


@pytest.fixture(scope="module")
def router(shards, tiny_moe_dir):
    router = build_router(config(tiny_moe_dir, [s.address for s in shards], expert_transport="dist",
                                 stall_timeout=0.5))
    yield router
    router.close()


def test_gloo_logits_equal_the_in_process_engine(router, tiny_moe_dir):
    assert router.dispatch.transports() == ["gloo", "gloo"]
    local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
    for batch in ([PROMPT], [PROMPT * 30, PROMPT[:3]]):  # 11 tokens, then 333: the buffers grow on the way
        remote = router.worker.call(router.engine.forward_logits, batch)
        for got, want in zip(remote, local.forward_logits(batch)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


async def test_sigkilled_shard_fails_the_step_fast_and_the_group_reforms(router, shards):
    async with serve_in_process(lambda s: add_to_server(router.servicer, s), name="router") as r:
        channel = client_channel(r.address)  # held: a channel nobody references is closed
        stub = router_pb2_grpc.RouterStub(channel)
        info = await stub.Info(router_pb2.RouterInfoRequest())
        assert [(p.address, p.transport) for p in info.placement] == [(s.address, "gloo") for s in shards]
        work = router_pb2.SequenceWork(seq_id="a", token_ids=PROMPT, position=0, sample=True)
        await stub.Step(router_pb2.StepRequest(work=[work]))
        # Shard 0 is waited for first, so the live shard 1's reply is still pending when the group breaks.
        shards[0].proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            nxt = router_pb2.SequenceWork(seq_id="a", token_ids=[5], position=len(PROMPT), sample=True)
            for _ in range(3):  # the kill lands between steps or during one
                await stub.Step(router_pb2.StepRequest(work=[nxt]))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and shards[0].address in failed.value.details()
        assert time.monotonic() - start < 1.0
        info = await stub.Info(router_pb2.RouterInfoRequest())
        assert [p.transport for p in info.placement] == ["gloo-down", "gloo-down"]
    shards[0].proc.wait(10)
    shards[0].start()
    assert await asyncio.to_thread(_step_until_ok, router, 60) < 60
    assert router.dispatch.transports() == ["gloo", "gloo"]


def test_stopped_shard_fails_on_its_missing_heartbeat_then_recovers(router, shards):
    os.kill(shards[1].proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ExpertCallError, match="stalled") as failed:
            router.worker.call(router.engine.forward_logits, [PROMPT])
        assert failed.value.status is ErrorStatus.UNAVAILABLE and time.monotonic() - start < 2.0  # stall_timeout 0.5 s
    finally:
        os.kill(shards[1].proc.pid, signal.SIGCONT)
    assert _step_until_ok(router, 30) < 30


async def test_join_refusals_name_the_reason(tiny_moe_dir):
    servicer = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=0, num_shards=2))
    async with serve_in_process(lambda s: expert_servicer.add_to_server(servicer, s), name="e0") as e:
        channel = client_channel(e.address)
        stub = expert_pb2_grpc.ExpertStub(channel)
        request = expert_pb2.JoinGroupRequest(store_address="127.0.0.1:1", group_name="g", rank=1, world_size=2,
                                              backend="nccl", hidden_size=64, top_k=2, dtype="float32",
                                              timeout_ms=300)
        reply = await stub.JoinGroup(request)
        assert not reply.ok and "backend nccl needs a CUDA shard" in reply.reason
        request.backend, request.dtype = "gloo", "bfloat16"
        reply = await stub.JoinGroup(request)
        assert not reply.ok and "dtype 'bfloat16' is not this shard's compute dtype 'float32'" in reply.reason
        request.dtype = "float32"  # nothing listens on port 1: the rendezvous is unreachable
        reply = await stub.JoinGroup(request)
        assert not reply.ok and "cannot join gloo group g at rendezvous 127.0.0.1:1" in reply.reason
    await servicer.close()


async def test_a_long_block_on_a_live_shard_beats_instead_of_failing(tiny_moe_dir):
    """Rank 0 and rank 1 in this one process (the groups are plain objects): a block computing 4x longer than the
    stall timeout comes back, because the shard sends heartbeats meanwhile (stall 0.25 s: beats every 62 ms survive
    a loaded 2-core machine, 0.1 s did not at load 15)."""
    servicer = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=0, num_shards=1))
    bank = servicer._shard.bank
    fast = bank.forward
    bank.forward = lambda *args: (time.sleep(1.0), fast(*args))[1]  # a slow shard, not a stalled one
    async with serve_in_process(lambda s: expert_servicer.add_to_server(servicer, s), name="e0") as e:
        client = GrpcShardClient(e.address, call_timeout=5)
        await asyncio.to_thread(client.placement)
        group = DistGroup([client], backend="gloo", hidden_size=64, top_k=2, dtype="float32", stall_timeout=0.25,
                          call_timeout=5)
        await asyncio.to_thread(group.form)
        hidden, ids, weights = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.rand(3, 2)
        link, start = group.links[0], time.monotonic()
        link.start(1, 0, hidden, ids, weights)
        got = await asyncio.to_thread(link.wait, 1, 0, 3)
        assert time.monotonic() - start >= 1.0 and group.formed
        torch.testing.assert_close(got, fast(0, hidden, ids, weights.where(ids >= 0, 0.0)))
        group.teardown()
        client.close()
    await servicer.close()


async def test_gloo_blocks_make_one_expert_step_span_joined_to_the_routers_trace(tiny_moe_dir):
    """The step's trace context rides on its first layer (tag CONTEXT); the shard aggregates the step's layers into
    one "expert.step" span under the router's span, ended once the router is idle (as over shared memory)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    servicer = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=0, num_shards=1))
    servicer._dist.tracer = provider.get_tracer("test")
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    context = f"traceparent=00-{trace_id}-{span_id}-01\nmoemesh-step-id=7"
    async with serve_in_process(lambda s: expert_servicer.add_to_server(servicer, s), name="e0") as e:
        client = GrpcShardClient(e.address, call_timeout=5)
        await asyncio.to_thread(client.placement)
        group = DistGroup([client], backend="gloo", hidden_size=64, top_k=2, dtype="float32", call_timeout=5)
        await asyncio.to_thread(group.form)
        hidden, ids, weights = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.rand(3, 2)
        link = group.links[0]
        for seq, (layer, ctx) in enumerate([(0, context), (1, "")], start=1):
            link.start(seq, layer, hidden, ids, weights, ctx)
            await asyncio.to_thread(link.wait, seq, layer, 3)
        deadline = time.monotonic() + 5
        while not exporter.get_finished_spans() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        group.teardown()
        client.close()
    await servicer.close()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "expert.step"]
    assert f"{span.context.trace_id:032x}" == trace_id and f"{span.parent.span_id:016x}" == span_id
    assert span.attributes["moemesh.expert.calls"] == 2 and span.attributes["moemesh.step_id"] == 7
    assert span.attributes["moemesh.expert.layers"] == 2 and span.attributes["moemesh.expert.tokens"] == 6
