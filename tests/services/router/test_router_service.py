"""Router over real gRPC with two real expert shards (tiny MoE, port 0): same tokens and logits as the engine with
local experts, Step/Release/Info semantics and status codes, placement validation, and the span policy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass

import grpc
import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from moemesh.runtime.engine import Engine
from moemesh.runtime.types import SamplingParams, SequenceWork
from moemesh.serving import RunningService, client_channel, serve_in_process
from moemesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.expert import servicer as expert_servicer
from services.expert.__main__ import build_servicer
from services.expert.config import ExpertConfig
from services.expert.step_spans import StepSpans
from services.router.__main__ import RouterProcess, build_router
from services.router.config import RouterConfig
from services.router.placement import PlacementError
from services.router.servicer import RouterServicer, add_to_server

KV_BLOCKS, BLOCK = 8, 16
PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28, 198, 4161, 2]  # 11 token ids


@dataclass
class Mesh:
    stub: router_pb2_grpc.RouterStub
    router: RouterProcess
    experts: list[RunningService]
    expert_servicers: list[expert_servicer.ExpertServicer]
    exporter: InMemorySpanExporter

    def spans(self, name: str):
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


def make_expert(model_dir, index: int, tracer, shards: int = 2) -> expert_servicer.ExpertServicer:
    servicer = build_servicer(ExpertConfig(model=str(model_dir), shard_index=index, num_shards=shards))
    servicer._spans = StepSpans(tracer, idle_s=60)
    return servicer


def router_config(model_dir, addrs, transport: str = "grpc") -> RouterConfig:
    """gRPC Forward calls (this file's spans and faults are theirs); test_shm_transport.py covers shared memory."""
    return RouterConfig(model=str(model_dir), expert_addrs=tuple(addrs), port=0, metrics_port=-1,
                        kv_blocks=KV_BLOCKS, block_size=BLOCK, connect_timeout=10, expert_timeout=10,
                        expert_transport=transport)


@contextlib.asynccontextmanager
async def served_router(model_dir, tracer):
    """Two expert shards and a router over gRPC links, served in this process: (router server, router, shard
    servers, shard servicers)."""
    servicers = [make_expert(model_dir, i, tracer) for i in (0, 1)]
    async with serve_in_process(lambda s: expert_servicer.add_to_server(servicers[0], s), name="expert-0") as a, \
            serve_in_process(lambda s: expert_servicer.add_to_server(servicers[1], s), name="expert-1") as b:
        router = await asyncio.to_thread(build_router, router_config(model_dir, [a.address, b.address]))
        servicer = RouterServicer(router.engine, router.worker, router.servicer._placement, tracer)
        async with serve_in_process(lambda s: add_to_server(servicer, s), name="router") as r:
            yield r, router, [a, b], servicers
        router.close()


@pytest.fixture
async def mesh(tiny_moe_dir):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with served_router(tiny_moe_dir, provider.get_tracer("test")) as (r, router, shards, servicers):
        yield Mesh(router_pb2_grpc.RouterStub(client_channel(r.address)), router, shards, servicers, exporter)


def work(seq: str, tokens: list[int], position: int, sample: bool = True) -> router_pb2.SequenceWork:
    sampling = common_pb2.SamplingParams(logprobs=True, top_logprobs=3)
    return router_pb2.SequenceWork(seq_id=seq, token_ids=tokens, position=position, sample=sample, sampling=sampling)


async def test_remote_experts_give_the_local_engines_tokens_and_logits(mesh, tiny_moe_dir):
    local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
    params = SamplingParams(logprobs=True, top_logprobs=3)
    remote_tokens, local_tokens, position, nxt = [], [], 0, PROMPT
    for step in range(5):
        reply = await mesh.stub.Step(router_pb2.StepRequest(step_id=step, work=[work("a", nxt, position)]))
        expected = local.step([SequenceWork("a", nxt, position, params)])[0]
        got = reply.results[0]
        assert got.token_id == expected.token_id
        assert got.logprob == pytest.approx(expected.logprob, abs=1e-4)
        assert [t.token_id for t in got.top_logprobs] == [t for t, _ in expected.top_logprobs]
        assert reply.tokens == len(nxt) and reply.compute_seconds > 0
        remote_tokens.append(got.token_id)
        local_tokens.append(expected.token_id)
        position, nxt = position + len(nxt), [got.token_id]
    assert remote_tokens == local_tokens
    remote = await mesh.router.worker.run(mesh.router.engine.forward_logits, [PROMPT])
    torch.testing.assert_close(remote[0], local.forward_logits([PROMPT])[0], rtol=1e-4, atol=1e-4)
    for shard in mesh.experts:  # both shards really computed tokens
        assert REGISTRY.get_sample_value("moemesh_router_expert_tokens_total", {"shard": shard.address}) > 0


async def test_one_span_per_step_and_per_shard_joined_by_the_experts(mesh):
    await mesh.stub.Step(router_pb2.StepRequest(step_id=7, work=[work("a", PROMPT, 0)]))
    for servicer in mesh.expert_servicers:  # recorded before each Forward returned; end the open step now
        servicer._spans.close()
    (step,) = mesh.spans("router.step")
    shard_spans = mesh.spans("expert.forward_step")
    assert len(shard_spans) == 2 and all(s.parent.span_id == step.context.span_id for s in shard_spans)
    assert {s.attributes["server.address"] for s in shard_spans} == {e.address for e in mesh.experts}
    assert all(s.attributes["moemesh.expert.calls"] == 2 and s.attributes["moemesh.step_id"] == 7
               for s in shard_spans)  # 2 MoE layers, aggregated into one span
    server_spans = mesh.spans("expert.step")
    assert sorted(s.parent.span_id for s in server_spans) == sorted(s.context.span_id for s in shard_spans)
    assert {s.context.trace_id for s in [step, *shard_spans, *server_spans]} == {step.context.trace_id}
    assert not mesh.spans("expert.forward")


async def test_trace_layers_flag_adds_per_layer_spans(mesh, monkeypatch):
    monkeypatch.setenv("MOEMESH_TRACE_LAYERS", "1")
    await mesh.stub.Step(router_pb2.StepRequest(step_id=1, work=[work("a", PROMPT, 0)]))
    layer_spans = mesh.spans("expert.forward")
    client = [s for s in layer_spans if s.kind == trace.SpanKind.CLIENT]
    server = [s for s in layer_spans if s.kind == trace.SpanKind.SERVER]
    assert len(client) == len(server) == 4  # 2 shards x 2 MoE layers
    assert sorted(s.parent.span_id for s in server) == sorted(s.context.span_id for s in client)


async def test_info_reports_model_limits_and_placement(mesh):
    info = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    assert info.num_experts == 4 and info.experts_per_token == 2 and list(info.moe_layers) == [0, 1]
    assert info.kv_blocks_total == info.kv_blocks_free == KV_BLOCKS and info.kv_block_size == BLOCK
    assert info.max_context == KV_BLOCKS * BLOCK and info.vocab_size == 49152 and list(info.eos_token_ids) == [2, 0]
    assert [(p.address, list(p.experts), list(p.layers)) for p in info.placement] == [
        (mesh.experts[0].address, [0, 1], [0, 1]), (mesh.experts[1].address, [2, 3], [0, 1])]
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.cuda_graphs == "off: device cpu is not CUDA" and info.quantization == "none"
    assert info.kv_cache_dtype == "float32"


async def test_step_without_sampling_and_release(mesh):
    reply = await mesh.stub.Step(router_pb2.StepRequest(work=[work("a", PROMPT[:5], 0, sample=False),
                                                              work("b", PROMPT, 0)]))
    assert not reply.results[0].HasField("token_id") and reply.results[1].HasField("token_id")
    assert reply.kv_blocks_free == KV_BLOCKS - 2 and reply.tokens == 5 + len(PROMPT)
    released = await mesh.stub.Release(router_pb2.ReleaseRequest(seq_ids=["a", "nope"]))
    assert (released.released, released.kv_blocks_free) == (1, KV_BLOCKS - 1)
    info = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    assert info.active_sequences == 1


@pytest.mark.parametrize("seq_work, text", [
    (lambda: work("new", PROMPT, 3), "position 3"),
    (lambda: work("a", [5], 4), "position 4 but it has 11 tokens cached"),
    (lambda: work("a", [49152], 11), "outside [0, 49152)"),
])
async def test_bad_positions_and_tokens_are_invalid_argument(mesh, seq_work, text):
    await mesh.stub.Step(router_pb2.StepRequest(work=[work("a", PROMPT, 0)]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Step(router_pb2.StepRequest(work=[seq_work()]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()


async def test_full_kv_cache_is_resource_exhausted_and_changes_nothing(mesh):
    long = (PROMPT * 10)[:100]  # 7 of the 8 blocks
    await mesh.stub.Step(router_pb2.StepRequest(work=[work("a", long, 0)]))
    other = work("b", PROMPT * 3, 0)
    other.tenant = "another-tenant"  # no prefix-cache hit on a's blocks: b needs 3 blocks of its own
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Step(router_pb2.StepRequest(work=[other]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    state = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    assert (state.active_sequences, state.kv_blocks_free) == (1, 1)
    await mesh.stub.Release(router_pb2.ReleaseRequest(seq_ids=["a"]))
    reply = await mesh.stub.Step(router_pb2.StepRequest(work=[work("b", PROMPT * 3, 0)]))
    assert reply.results[0].HasField("token_id")


async def test_shard_down_is_unavailable_and_rolls_the_step_back(mesh):
    await mesh.experts[1].stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Step(router_pb2.StepRequest(work=[work("a", PROMPT, 0)]))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and mesh.experts[1].address in info.value.details()
    state = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    assert (state.active_sequences, state.kv_blocks_free) == (0, KV_BLOCKS)


async def test_incomplete_or_overlapping_placement_refuses_to_start(tiny_moe_dir):
    tracer = TracerProvider().get_tracer("test")
    first, again = make_expert(tiny_moe_dir, 0, tracer), make_expert(tiny_moe_dir, 0, tracer)
    async with serve_in_process(lambda s: expert_servicer.add_to_server(first, s), name="e0") as a, \
            serve_in_process(lambda s: expert_servicer.add_to_server(again, s), name="e0-again") as b:
        with pytest.raises(PlacementError, match="hosted by no shard: layer 0: experts 2-3; layer 1: experts 2-3"):
            await asyncio.to_thread(build_router, router_config(tiny_moe_dir, [a.address]))
        with pytest.raises(PlacementError, match="more than one shard: layer 0: experts 0-1"):
            await asyncio.to_thread(build_router, router_config(tiny_moe_dir, [a.address, b.address]))
        # The process: exits 1 with the message (and no traceback) instead of serving.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.router", "--model", str(tiny_moe_dir), "--expert-addrs", a.address,
            "--port", "0", "--metrics-port", "-1", stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "MOEMESH_HOME": str(tiny_moe_dir.parent / "home")},
        )
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1 and b"experts hosted by no shard: layer 0: experts 2-3" in err
    assert b"Traceback" not in err


async def test_without_expert_addrs_the_experts_run_in_the_router(tiny_moe_dir):
    router = await asyncio.to_thread(build_router, router_config(tiny_moe_dir, []))
    try:
        async with serve_in_process(lambda s: add_to_server(router.servicer, s), name="router-local") as r:
            stub = router_pb2_grpc.RouterStub(client_channel(r.address))
            info = await stub.Info(router_pb2.RouterInfoRequest())
            assert [(p.address, list(p.experts)) for p in info.placement] == [("local", [0, 1, 2, 3])]
            local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
            reply = await stub.Step(router_pb2.StepRequest(work=[work("a", PROMPT, 0)]))
            assert reply.results[0].token_id == local.step([SequenceWork("a", PROMPT, 0)])[0].token_id
    finally:
        router.close()


async def test_expert_token_counters_in_info_and_prometheus(mesh):
    start = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    before = {layer.layer: list(layer.tokens) for layer in start.expert_tokens}
    await mesh.stub.Step(router_pb2.StepRequest(step_id=1, work=[work("a", PROMPT, 0), work("b", PROMPT[:3], 0)]))
    info = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    after = {layer.layer: list(layer.tokens) for layer in info.expert_tokens}
    assert sorted(after) == [0, 1] and all(len(tokens) == 4 for tokens in after.values())
    for layer, tokens in after.items():  # 14 tokens, top-2: 28 expert slots per MoE layer
        assert sum(tokens) - sum(before.get(layer, [0] * 4)) == (len(PROMPT) + 3) * 2
    scraped = {(layer, e): await asyncio.to_thread(REGISTRY.get_sample_value, "moemesh_expert_tokens_total",
                                                    {"layer": str(layer), "expert": str(e)})
               for layer in (0, 1) for e in range(4)}  # off the loop: the scrape waits for the engine thread
    assert scraped == {(layer, e): after[layer][e] for layer in (0, 1) for e in range(4)}


async def test_prefix_cache_over_grpc_per_tenant_with_release_in_the_step(mesh):
    """Tenant t hits its own prefix (not u's); releases ride in the step; sampling is sent once per sequence."""
    prompt = (PROMPT * 4)[:40]  # 2 full blocks of 16, then 8 tokens
    first = await mesh.stub.Step(router_pb2.StepRequest(work=[_tenant(work("a", prompt, 0), "t")]))
    assert first.results[0].cached_tokens == 0 and first.kv_blocks_own == {"a": 3}
    b = await mesh.stub.Step(router_pb2.StepRequest(work=[_tenant(work("b", prompt, 0), "t")], release=["a"]))
    assert (b.released, b.results[0].cached_tokens, b.kv_blocks_own["b"]) == (1, 32, 3)  # a's blocks now b's alone
    assert b.results[0].token_id == first.results[0].token_id
    other = await mesh.stub.Step(router_pb2.StepRequest(work=[_tenant(work("c", prompt, 0), "u")]))
    assert other.results[0].cached_tokens == 0  # another tenant never sees t's blocks
    decode = router_pb2.SequenceWork(seq_id="b", token_ids=[b.results[0].token_id], position=40, sample=True)
    step = await mesh.stub.Step(router_pb2.StepRequest(work=[decode]))  # no sampling: b keeps its own (logprobs)
    assert len(step.results[0].top_logprobs) == 3
    info = await mesh.stub.Info(router_pb2.RouterInfoRequest())
    stats = {s.tenant: (s.prompt_tokens, s.cached_tokens) for s in info.prefix_cache_tenants}
    assert info.prefix_cache and stats == {"t": (80, 32), "u": (40, 0)}
    assert REGISTRY.get_sample_value("moemesh_router_prefix_cache_cached_tokens_total", {"tenant": "t"}) >= 32


def _tenant(w: router_pb2.SequenceWork, tenant: str) -> router_pb2.SequenceWork:
    w.tenant = tenant
    return w
