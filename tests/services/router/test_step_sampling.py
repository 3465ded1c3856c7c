"""Sampled step tracing (services/batcher/router_client.py, Sampling; services/router/step_trace.py): over real gRPC
(the batcher's RouterClient -> router -> two expert shards, the process's SDK tracer provider), a traced step makes
its spans at every hop and an untraced one makes none anywhere, nor a root trace of its own."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.v1 import common_pb2
from services.batcher.router_client import RouterClient
from services.batcher.sequence import Sequence
from services.batcher.step import SequenceWork, StepPlan
from span_capture import memory_exporter
from tests.services.router.test_router_service import PROMPT, served_router

@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return memory_exporter("sampling-tests")


@pytest.fixture
async def client(tiny_moe_dir, exporter):
    async with served_router(tiny_moe_dir, trace.get_tracer("sampling-tests")) as (r, _, _, servicers):
        client = RouterClient(r.address, trace_every=4)
        yield client, servicers
        await client.close()


def _traced_steps(exporter: InMemorySpanExporter, name: str) -> list[int]:
    return sorted(s.attributes["moemesh.step_id"] for s in exporter.get_finished_spans() if s.name == name)


def _seq(seq_id: str, request) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_ids=PROMPT, max_tokens=16, sampling=common_pb2.SamplingParams(),
                    trace=trace.set_span_in_context(request))


async def test_only_first_every_nth_and_after_failure_steps_make_spans_at_every_hop(client, exporter) -> None:
    client, shards = client
    exporter.clear()
    with trace.get_tracer("sampling-tests").start_as_current_span("generate") as request:
        a, b = _seq("a", request), _seq("b", request)
    outcome = await client.step(StepPlan(step_id=1, items=[SequenceWork(a, PROMPT, 0, True),
                                                           SequenceWork(b, PROMPT, 0, True)]))
    position, token, b_token = len(PROMPT), outcome.outputs[0].token_id, outcome.outputs[1].token_id
    for step_id in (2, 3, 4, 5, 7):
        if step_id == 7:  # a failed step (position mismatch) first: the next one is traced
            with pytest.raises(Exception, match="position"):
                await client.step(StepPlan(step_id=6, items=[SequenceWork(a, [token], position + 5, True)]))
        outcome = await client.step(StepPlan(step_id=step_id, items=[SequenceWork(a, [token], position, True)]))
        position, token = position + 1, outcome.outputs[0].token_id
    # two steps in flight at once (as pipelining has them): step 10 is sent while step 9 runs; neither is traced
    first = asyncio.ensure_future(client.step(StepPlan(step_id=9, items=[SequenceWork(a, [token], position, True)])))
    await asyncio.sleep(0.001)
    await asyncio.gather(first, client.step(StepPlan(step_id=10,
                                                     items=[SequenceWork(b, [b_token], len(PROMPT), True)])))
    for shard in shards:  # a shard's step span ends when the router's next step comes, when idle, or here
        shard._spans.close()
    for name in ("batcher.step", "router.step"):  # 1: the sequences start; 4: every 4th; 7: after a failed step
        assert _traced_steps(exporter, name) == [1, 4, 7], name
    for name in ("expert.forward_step", "expert.step"):  # one per shard
        assert _traced_steps(exporter, name) == [1, 1, 4, 4, 7, 7], name
    spans = exporter.get_finished_spans()
    # untraced steps start no trace of their own anywhere (their Step calls' client and server spans included)
    assert {s.context.trace_id for s in spans} == {request.get_span_context().trace_id}
    assert sum(s.name.endswith("Router/Step") for s in spans) == 2 * 3  # client + server span of 1, 4, 7
