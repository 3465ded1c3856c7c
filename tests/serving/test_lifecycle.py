"""Health, reflection, metrics and graceful drain of a service over real sockets."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.serving import ServiceConfig, client_channel, serve_in_process, start_service
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc

from .echo import BATCHER, TOKENIZER, SlowBatcher, register_echo

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_serving_for_each_service_and_overall() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        health = health_pb2_grpc.HealthStub(channel)
        for name in (TOKENIZER, BATCHER, ""):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="moemesh.v1.Nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_registered_services() -> None:
    async with serve_in_process(register_echo()) as svc:
        channel = client_channel(svc.address)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in stub.ServerReflectionInfo(ask()):
            names = {s.name for s in response.list_services_response.service}
            break
    assert {TOKENIZER, BATCHER, "grpc.health.v1.Health"} <= names


async def test_metrics_endpoint_counts_rpcs() -> None:
    config = ServiceConfig(port=0, metrics_port=0)
    async with serve_in_process(register_echo(), name="metrics-test", config=config) as svc:
        channel = client_channel(svc.address)
        stub = batcher_pb2_grpc.BatcherStub(channel)
        await stub.Stats(batcher_pb2.StatsRequest())
        url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    line = 'moemesh_rpc_server_handled_total{code="OK",method="/moemesh.v1.Batcher/Stats",service="metrics-test"} 1.0'
    assert line in text


@pytest.mark.parametrize("metrics_host, bound", [("", "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
async def test_metrics_listen_on_the_service_host_unless_configured(metrics_host, bound) -> None:
    config = ServiceConfig(host="127.0.0.1", port=0, metrics_port=0, metrics_host=metrics_host)
    async with serve_in_process(register_echo(), name="metrics-host", config=config) as svc:
        assert svc._metrics_http.server_address[0] == bound


async def test_drain_finishes_in_flight_stream_refuses_new_calls() -> None:
    batcher = SlowBatcher(delay=0.1)
    svc = await start_service(ServiceConfig(port=0, metrics_port=-1), register_echo(batcher), name="drain")
    channel = client_channel(svc.address)
    stub = batcher_pb2_grpc.BatcherStub(channel)

    async def consume() -> list[int]:
        return [e.token_ids[0] async for e in stub.Generate(batcher_pb2.GenerateRequest(prompt_ids=list(range(1, 11))))]

    stream = asyncio.create_task(consume())
    await batcher.started.wait()
    stopping = asyncio.create_task(svc.stop(grace=10.0))
    await asyncio.sleep(0.2)  # inside the drain: the stream still has ~0.8 s to go
    assert not stream.done() and not stopping.done()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Stats(batcher_pb2.StatsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await stream == list(range(1, 11))
    await asyncio.wait_for(stopping, 5)
    await channel.close()


async def test_drain_grace_cuts_off_a_stream_that_runs_too_long() -> None:
    batcher = SlowBatcher(delay=0.2)
    svc = await start_service(ServiceConfig(port=0, metrics_port=-1), register_echo(batcher), name="drain-cut")
    channel = client_channel(svc.address)
    stub = batcher_pb2_grpc.BatcherStub(channel)
    call = stub.Generate(batcher_pb2.GenerateRequest(prompt_ids=list(range(1, 100))))
    await batcher.started.wait()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await svc.stop(grace=0.5)
    assert loop.time() - start < 3
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in call:
            pass


async def test_health_turns_not_serving_when_draining() -> None:
    svc = await start_service(ServiceConfig(port=0, metrics_port=-1), register_echo(), name="h")
    await svc.health.enter_graceful_shutdown()
    channel = client_channel(svc.address)
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == NOT_SERVING
    await svc.stop(0)


async def test_port_in_use_is_a_clear_error() -> None:
    async with serve_in_process(register_echo()) as svc:
        with pytest.raises(OSError, match=f"127.0.0.1:{svc.port}"):
            await start_service(ServiceConfig(port=svc.port, metrics_port=-1), register_echo(), name="dup")
