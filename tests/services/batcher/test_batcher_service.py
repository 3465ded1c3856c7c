"""The batcher over real gRPC (port 0) in front of a real router serving the tiny MoE: streaming, stop conditions,
cancellation, backpressure, deadlines, invalid input, preemption under a small KV cache, and tenant fairness."""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from opentelemetry import trace
from prometheus_client import REGISTRY
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.v1 import batcher_pb2, common_pb2
from services.batcher.router_client import RouterClient
from services.batcher.sequence import Sequence
from services.batcher.step import SequenceWork, StepPlan
from tests.services.batcher.mesh import code_of, mesh, request_for

PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28]


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_generate_streams_tokens_and_ends_with_the_figures(tiny_moe_dir):
    async with mesh(tiny_moe_dir) as m:
        ttft, itl = sample("moemesh_batcher_time_to_first_token_seconds_count"), sample(
            "moemesh_batcher_inter_token_latency_seconds_count")
        busy = sample("moemesh_batcher_router_busy_seconds_total")
        r = await m.generate(PROMPT, max_tokens=6)
        assert sample("moemesh_batcher_time_to_first_token_seconds_count") == ttft + 1
        assert sample("moemesh_batcher_inter_token_latency_seconds_count") == itl + 5
        assert sample("moemesh_batcher_router_busy_seconds_total") > busy
        assert len(r.tokens) == 6 and all(len(e.token_ids) == 1 for e in r.events)
        last = r.events[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.prompt_tokens, last.completion_tokens) == (len(PROMPT), 6)
        assert last.engine_seconds > 0 and last.queue_seconds >= 0 and last.preemptions == 0
        assert all(e.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for e in r.events[:-1])

        # greedy decoding is deterministic: stopping on the 3rd token's id ends the stream right there
        req = request_for(PROMPT, 6, "t")
        req.sampling.stop_token_ids.append(r.tokens[2])
        events = [e async for e in m.batcher.Generate(req)]
        got = [t for e in events for t in e.token_ids]
        assert got == r.tokens[: r.tokens.index(r.tokens[2]) + 1]
        assert events[-1].finish_reason == common_pb2.FINISH_REASON_STOP
        info = await m.router_info()
        assert info.active_sequences == 0 and info.kv_blocks_free == info.kv_blocks_total
        stats = await m.batcher.Stats(batcher_pb2.StatsRequest())
        assert stats.steps >= 6 and stats.max_batch_size == 32 and stats.kv_blocks_total == info.kv_blocks_total


async def test_logprobs_travel_when_asked(tiny_moe_dir):
    async with mesh(tiny_moe_dir) as m:
        req = request_for(PROMPT, 3, "t")
        req.sampling.logprobs, req.sampling.top_logprobs = True, 2
        events = [e async for e in m.batcher.Generate(req)]
        assert all(len(e.logprobs) == 1 and len(e.top_logprobs) == 2 for e in events)
        assert all(e.logprobs[0].logprob <= 0 for e in events)


async def test_cancelled_stream_is_released_in_the_router_within_one_step(tiny_moe_dir):
    async with mesh(tiny_moe_dir) as m:
        other = asyncio.ensure_future(m.generate(PROMPT, max_tokens=60, tenant="other"))  # keeps steps going
        req = request_for(PROMPT + [5] * 20, 500, "t", request_id="gone")
        call = m.batcher.Generate(req)
        async for _ in call:
            break
        before = (await m.router_info()).kv_blocks_free
        call.cancel()
        for _ in range(400):
            info = await m.router_info()
            if info.active_sequences == 1:
                break
            await asyncio.sleep(0.005)
        assert info.active_sequences == 1  # only `other` holds KV cache now
        assert info.kv_blocks_free >= before + 1  # the cancelled sequence's 2 blocks came back (other may grow)
        # from the moment the batcher learnt of the cancel: at most the step in flight, then Release
        after = m.log[m.log.index(("cancel", "gone")):]
        released_at = next(k for k, (kind, ids) in enumerate(after) if kind == "release" and "gone" in ids)
        assert [kind for kind, _ in after[1:released_at]] in ([], ["step"])
        assert not any("gone" in ids for kind, ids in after[released_at:] if kind == "step")
        await other
        info = await m.router_info()
        assert info.active_sequences == 0 and info.kv_blocks_free == info.kv_blocks_total


async def test_cancel_by_request_id(tiny_moe_dir):
    async with mesh(tiny_moe_dir) as m:
        req = request_for(PROMPT, 500, "t", request_id="cancel-me")
        call = m.batcher.Generate(req)
        first = await call.read()
        assert first.token_ids
        assert (await m.batcher.Cancel(batcher_pb2.CancelRequest(request_id="cancel-me"))).found
        rest = [e async for e in call]
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert not (await m.batcher.Cancel(batcher_pb2.CancelRequest(request_id="cancel-me"))).found


async def test_full_queue_answers_resource_exhausted_promptly_then_recovers(tiny_moe_dir):
    async with mesh(tiny_moe_dir, max_batch_size=1, max_queue=2, max_step_tokens=64) as m:
        busy = [m.batcher.Generate(request_for(PROMPT, 1000, "t"))]
        await busy[0].read()  # running: the next two wait (arriving together with it, one would be refused)
        busy += [m.batcher.Generate(request_for(PROMPT, 1000, "t")) for _ in range(2)]
        for _ in range(200):
            stats = await m.batcher.Stats(batcher_pb2.StatsRequest())
            if (stats.running, stats.waiting) == (1, 2):
                break
            await asyncio.sleep(0.01)
        assert (stats.running, stats.waiting) == (1, 2)
        start = time.perf_counter()
        extra = m.batcher.Generate(request_for(PROMPT, 4, "t"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await extra.read()
        assert time.perf_counter() - start < 1.0
        assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.value.details()
        trailing = dict(await extra.trailing_metadata())
        assert int(trailing["retry-after-ms"]) >= 50
        for call in busy:  # load drops
            call.cancel()
        r = await m.generate(PROMPT, max_tokens=4)
        assert len(r.tokens) == 4 and r.events[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_deadline_passing_in_the_queue_is_deadline_exceeded_without_compute(tiny_moe_dir):
    async with mesh(tiny_moe_dir, max_batch_size=1) as m:
        busy = m.batcher.Generate(request_for(PROMPT, 400, "t"))
        await busy.read()
        soon = int(time.time() * 1000) + 150
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await m.generate(PROMPT, max_tokens=4, deadline_unix_ms=soon)
        assert code_of(err.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the gRPC deadline counts too
            [e async for e in m.batcher.Generate(request_for(PROMPT, 4, "t"), timeout=0.2)]
        assert code_of(err.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        busy.cancel()
        await asyncio.sleep(0.1)
        info = await m.router_info()
        assert info.active_sequences == 0


async def test_invalid_requests_name_the_field(tiny_moe_dir):
    async with mesh(tiny_moe_dir) as m:
        info = await m.router_info()
        cases = [
            (request_for([], 4, "t"), "prompt_ids"),
            (request_for([5] * info.max_context, 4, "t"), "context window"),
            (request_for(PROMPT, 4, "t", model="no-such-model"), "model"),
            (request_for(PROMPT, 4, "t", request_id=""), "request_id"),
        ]
        for req, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [e async for e in m.batcher.Generate(req)]
            assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert len((await m.generate(PROMPT, max_tokens=2, model=m.model)).tokens) == 2  # still serving


async def test_small_kv_cache_preempts_and_every_request_still_completes(tiny_moe_dir):
    # 6 blocks of 16 tokens; 4 sequences of 8 + 40 tokens need 3 blocks each: they cannot all stay
    async with mesh(tiny_moe_dir, kv_blocks=6, max_step_tokens=64) as m:
        results = await asyncio.gather(*[m.generate(PROMPT, max_tokens=40, tenant=f"t{i}") for i in range(4)])
        assert all(len(r.tokens) == 40 for r in results)
        assert sum(r.events[-1].preemptions for r in results) >= 1
        stats = await m.batcher.Stats(batcher_pb2.StatsRequest())
        assert stats.preemptions == sum(r.events[-1].preemptions for r in results)
        info = await m.router_info()
        assert info.active_sequences == 0 and info.kv_blocks_free == 6


async def test_a_tenant_flood_does_not_starve_another(tiny_moe_dir):
    """A floods 100 requests; B sends 5 alongside. With the default knobs (batch 32, max_wait 100 ms), B's p95 time
    to first token stays within 3x of B's unloaded one; a request A sends at the same moment waits far longer."""
    async with mesh(tiny_moe_dir, kv_blocks=256, max_wait_ms=100.0) as m:
        await m.generate(PROMPT, max_tokens=2)  # warm-up
        alone = [(await m.generate(PROMPT, max_tokens=4, tenant="B")).ttft for _ in range(5)]
        flood = [asyncio.ensure_future(m.generate(PROMPT, max_tokens=8, tenant="A")) for _ in range(100)]
        for _ in range(200):
            if (await m.batcher.Stats(batcher_pb2.StatsRequest())).waiting >= 50:
                break
            await asyncio.sleep(0.005)
        late_a = asyncio.ensure_future(m.generate(PROMPT, max_tokens=8, tenant="A"))
        loaded = await asyncio.gather(*[m.generate(PROMPT, max_tokens=4, tenant="B") for _ in range(5)])
        await asyncio.gather(*flood)
        b_ttft = sorted(r.ttft for r in loaded)
        p95 = b_ttft[-1]  # of 5 samples
        unloaded = statistics.median(alone)
        # B's first token shares its step with A's decoding half of the batch: that step is slower than an unloaded
        # one by up to ~0.25 s on a busy 2-core CI machine, whatever the fairness (fairness is the line below)
        assert p95 <= 3 * unloaded + 0.25, f"B p95 {p95:.3f}s vs unloaded {unloaded:.3f}s"
        assert (await late_a).ttft > 2 * p95  # without fair queuing B would have waited like this


async def test_a_step_span_joins_one_request_trace_and_links_the_others(tiny_moe_dir):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    async with mesh(tiny_moe_dir) as m:
        client = RouterClient(m.router_address, span_tracer=tracer)
        seqs = []
        for name in ("a", "b"):
            with tracer.start_as_current_span(f"generate-{name}"):
                seqs.append(Sequence(seq_id=f"trace-{name}", prompt_ids=PROMPT, max_tokens=1,
                                     sampling=common_pb2.SamplingParams(), trace=trace.set_span_in_context(
                                         trace.get_current_span())))
        plan = StepPlan(step_id=7, items=[SequenceWork(s, PROMPT, 0, True) for s in seqs])
        outcome = await client.step(plan)
        assert [o.seq_id for o in outcome.outputs] == ["trace-a", "trace-b"] and outcome.compute_seconds > 0
        await client.release(["trace-a", "trace-b"])
        await client.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    step, a, b = spans["batcher.step"], spans["generate-a"], spans["generate-b"]
    assert step.parent.span_id == a.context.span_id and step.context.trace_id == a.context.trace_id
    assert [link.context.span_id for link in step.links] == [b.context.span_id]
    assert step.attributes["moemesh.step_id"] == 7 and step.attributes["moemesh.tokens"] == 2 * len(PROMPT)
