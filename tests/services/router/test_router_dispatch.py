"""RemoteDispatch without sockets: shard clients that run real ExpertBanks in process (what a shard would compute),
recording what each shard was sent; the step trace it fills; the engine thread keeps the caller's context."""

from __future__ import annotations

import contextvars
from concurrent.futures import Future

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.types import ExpertPlacement
from services.router.dispatch import ForwardResult, RemoteDispatch
from services.router.engine_worker import EngineWorker
from services.router.step_trace import step_scope


class BankShard:
    """A ShardClient running an ExpertBank in process; keeps every block it was sent."""

    def __init__(self, address: str, bank: ExpertBank) -> None:
        self.address, self.bank, self.sent = address, bank, []

    def placement(self) -> ExpertPlacement:
        return ExpertPlacement(self.address, self.bank.layers, self.bank.experts)

    def submit(self, layer, hidden, expert_ids, weights, step_id, headers):
        self.sent.append((layer, hidden, expert_ids, weights, step_id, headers))
        future: Future = Future()
        future.set_result(ForwardResult(self.bank.forward(layer, hidden, expert_ids.long(), weights), 0.001, 0.002))
        return future


@pytest.fixture(scope="module")
def banks(tiny_moe_dir):
    """(all experts, experts 0-1, experts 2-3) of the tiny model."""
    return (ExpertBank.load(tiny_moe_dir), ExpertBank.load(tiny_moe_dir, experts=(0, 1)),
            ExpertBank.load(tiny_moe_dir, experts=(2, 3)))


def routed_block(tokens: int = 9, experts: int = 4, k: int = 2, hidden: int = 64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen)  # [T, H]
    weights, ids = torch.randn(tokens, experts, generator=gen).softmax(-1).topk(k, dim=-1)  # [T, K]
    ids[0] = torch.tensor([0, 1])  # token 0 only on shard 0
    ids[1, 1] = -1  # an unused slot
    return x, ids, weights


def test_each_shard_gets_only_its_tokens_and_the_sum_is_all_experts(banks):
    full = banks[0]
    shards = [BankShard("s0", banks[1]), BankShard("s1", banks[2])]
    dispatch = RemoteDispatch.connect(shards, (0, 1), 4)
    x, ids, weights = routed_block()
    out = dispatch(1, x, ids, weights)
    torch.testing.assert_close(out, full.forward(1, x, ids, weights), rtol=1e-5, atol=1e-6)
    for shard, hosted in zip(shards, ({0, 1}, {2, 3})):
        (layer, block, sent_ids, sent_w, _, headers), = shard.sent
        expected_rows = [t for t in range(len(ids)) if hosted & set(ids[t].tolist())]
        assert layer == 1 and block.shape == (len(expected_rows), 64) and headers == {}
        assert sent_ids.dtype == torch.int32 and set(sent_ids.flatten().tolist()) <= hosted | {-1}
        assert torch.equal(sent_w[sent_ids < 0], torch.zeros_like(sent_w[sent_ids < 0]))
    assert len(shards[1].sent[0][1]) < len(x)  # token 0 was not sent to shard 1


def test_step_trace_aggregates_calls_per_shard(banks):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    shards = [BankShard("s0", banks[1]), BankShard("s1", banks[2])]
    dispatch = RemoteDispatch.connect(shards, (0, 1), 4)
    x, ids, weights = routed_block()
    with step_scope(42, provider.get_tracer("t"), per_layer=False):
        for layer in (0, 1, 0, 1):
            dispatch(layer, x, ids, weights)
    spans = {s.attributes["server.address"]: s for s in exporter.get_finished_spans()
             if s.name == "expert.forward_step"}
    assert set(spans) == {"s0", "s1"}
    for shard in shards:
        attrs = spans[shard.address].attributes
        assert attrs["moemesh.expert.calls"] == 4 and attrs["moemesh.expert.layers"] == 2
        assert attrs["moemesh.expert.tokens"] == sum(len(s[1]) for s in shard.sent)
        assert attrs["moemesh.expert.compute_seconds"] == 4 * 0.001
        traceparents = {s[5]["traceparent"] for s in shard.sent}
        assert len(traceparents) == 1  # every call of the step carries the shard span's context
        assert f"{spans[shard.address].context.span_id:016x}" in traceparents.pop()
        assert {s[4] for s in shard.sent} == {42} and {s[5]["moemesh-step-id"] for s in shard.sent} == {"42"}


async def test_engine_worker_runs_under_the_callers_context():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")
    tracer = TracerProvider().get_tracer("t")
    worker = EngineWorker()
    try:
        var.set("caller")
        with tracer.start_as_current_span("rpc") as span:
            seen_var, seen_span = await worker.run(lambda: (var.get(), trace.get_current_span()))
        assert seen_var == "caller" and seen_span is span
    finally:
        worker.shutdown()
