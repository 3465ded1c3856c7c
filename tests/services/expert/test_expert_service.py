"""Expert shard over real gRPC (port 0): Forward equals ExpertBank.forward, bad input gets the right status naming
the field, Info reports the placement, and the per-layer calls make one aggregated span per step."""

from __future__ import annotations

import grpc
import pytest
import torch
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.spec import load_spec
from moemesh.serving import client_channel, serve_in_process
from moemesh.serving.tensors import from_proto, to_proto
from moemesh.v1 import expert_pb2, expert_pb2_grpc
from services.expert.__main__ import build_servicer
from services.expert.config import ExpertConfig
from services.expert.servicer import add_to_server
from services.expert.step_spans import StepSpans


def config_for(model_dir, index: int, shards: int = 2) -> ExpertConfig:
    return ExpertConfig(model=str(model_dir), shard_index=index, num_shards=shards, port=0, metrics_port=-1)


def block(model_dir, tokens: int = 5, seed: int = 0):
    spec = load_spec(model_dir)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, spec.hidden_size, generator=gen)  # [T, H]
    logits = torch.randn(tokens, spec.num_experts, generator=gen)
    weights, ids = logits.softmax(-1).topk(spec.moe.top_k, dim=-1)  # [T, K]
    ids[0, -1] = -1  # an unused slot
    return spec, hidden, ids.to(torch.int32), weights.float()


def request(layer, hidden, ids, weights, step_id=1) -> expert_pb2.ExpertRequest:
    return expert_pb2.ExpertRequest(layer=layer, hidden=to_proto(hidden), expert_ids=to_proto(ids),
                                    weights=to_proto(weights), step_id=step_id)


@pytest.fixture
async def shards(tiny_moe_dir):
    """Two shard servers (0 and 1 of 2) and an Expert stub to each."""
    async with serve_in_process(lambda s: add_to_server(build_servicer(config_for(tiny_moe_dir, 0)), s),
                                name="expert-0") as a, \
            serve_in_process(lambda s: add_to_server(build_servicer(config_for(tiny_moe_dir, 1)), s),
                             name="expert-1") as b:
        yield [expert_pb2_grpc.ExpertStub(client_channel(svc.address)) for svc in (a, b)]


async def test_forward_matches_expert_bank_and_shards_sum_to_all_experts(tiny_moe_dir, shards):
    spec, hidden, ids, weights = block(tiny_moe_dir)
    full = ExpertBank.load(tiny_moe_dir)
    half = ExpertBank.load(tiny_moe_dir, experts=(0, 1))
    for layer in spec.moe_layers:
        outs = [from_proto((await stub.Forward(request(layer, hidden, ids, weights))).output) for stub in shards]
        direct = half.forward(layer, hidden, ids.long(), weights)
        assert outs[0].shape == hidden.shape and outs[0].dtype == hidden.dtype
        torch.testing.assert_close(outs[0], direct, rtol=0, atol=0)
        torch.testing.assert_close(outs[0] + outs[1], full.forward(layer, hidden, ids.long(), weights),
                                   rtol=1e-5, atol=1e-6)
        assert outs[0].abs().sum() > 0 and outs[1].abs().sum() > 0


async def test_empty_block_returns_empty_output(tiny_moe_dir, shards):
    spec, hidden, ids, weights = block(tiny_moe_dir)
    response = await shards[0].Forward(request(spec.moe_layers[0], hidden[:0], ids[:0], weights[:0]))
    assert list(from_proto(response.output).shape) == [0, spec.hidden_size]


@pytest.mark.parametrize("field, mutate", [
    ("hidden", lambda h, i, w: (h[:, :-1], i, w)),
    ("hidden", lambda h, i, w: (h.bfloat16(), i, w)),
    ("expert_ids", lambda h, i, w: (h, i.long(), w)),
    ("expert_ids", lambda h, i, w: (h, i[:-1], w[:-1])),
    ("expert_ids", lambda h, i, w: (h, i + 100, w)),
    ("weights", lambda h, i, w: (h, i, w[:, :1])),
    ("weights", lambda h, i, w: (h, i, w.half())),
])
async def test_bad_tensors_are_invalid_argument_naming_the_field(tiny_moe_dir, shards, field, mutate):
    spec, hidden, ids, weights = block(tiny_moe_dir)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shards[0].Forward(request(spec.moe_layers[0], *mutate(hidden, ids, weights)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


async def test_truncated_payload_is_invalid_argument(tiny_moe_dir, shards):
    spec, hidden, ids, weights = block(tiny_moe_dir)
    req = request(spec.moe_layers[0], hidden, ids, weights)
    req.hidden.data = req.hidden.data[:-4]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shards[0].Forward(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden" in info.value.details()


async def test_layer_not_hosted_is_failed_precondition(tiny_moe_dir, shards):
    spec, hidden, ids, weights = block(tiny_moe_dir)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shards[1].Forward(request(spec.num_layers + 3, hidden, ids, weights))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"layer {spec.num_layers + 3}" in info.value.details()


async def test_info_reports_placement(tiny_moe_dir, shards):
    spec = load_spec(tiny_moe_dir)
    infos = [await stub.Info(expert_pb2.ExpertInfoRequest()) for stub in shards]
    assert [list(i.experts) for i in infos] == [[0, 1], [2, 3]]
    assert all(list(i.layers) == list(spec.moe_layers) for i in infos)
    assert [i.shard_index for i in infos] == [0, 1] and infos[0].num_shards == 2
    assert infos[0].backend == "torch" and infos[0].dtype == "float32" and infos[0].device == "cpu"
    assert infos[0].weight_bytes > 0


async def test_one_span_per_step_not_per_layer(tiny_moe_dir):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    servicer = build_servicer(config_for(tiny_moe_dir, 0))
    servicer._spans = StepSpans(tracer, idle_s=60)  # only step changes and close() end spans here
    spec, hidden, ids, weights = block(tiny_moe_dir)
    parents = []
    async with serve_in_process(lambda s: add_to_server(servicer, s), name="expert-spans") as svc:
        stub = expert_pb2_grpc.ExpertStub(grpc.aio.insecure_channel(svc.address))
        await stub.Forward(request(spec.moe_layers[0], hidden, ids, weights))  # no trace context: no span
        for step in (1, 2):
            with tracer.start_as_current_span(f"router-step-{step}") as parent:
                parents.append(parent.get_span_context().span_id)
                carrier = {"moemesh-step-id": str(step)}
                propagate.inject(carrier)
            for _ in range(3):
                for layer in spec.moe_layers:
                    await stub.Forward(request(layer, hidden, ids, weights, step), metadata=tuple(carrier.items()))
        spans = [s for s in exporter.get_finished_spans() if s.name == "expert.step"]
        assert len(spans) == 1  # step 1 ended when step 2 began; step 2 still open
        await servicer.close()
    spans = [s for s in exporter.get_finished_spans() if s.name == "expert.step"]
    assert [s.parent.span_id for s in spans] == parents
    assert [s.attributes["moemesh.step_id"] for s in spans] == [1, 2]
    calls = 3 * len(spec.moe_layers)
    assert all(s.attributes["moemesh.expert.calls"] == calls and s.kind == trace.SpanKind.SERVER for s in spans)
    assert spans[0].attributes["moemesh.expert.layers"] == len(spec.moe_layers)
    assert spans[0].attributes["moemesh.expert.bytes_received"] > hidden.numel() * 4 * calls
