"""Backpressure from slow readers: a stream whose client does not read is parked (out of the batch and the fair
order) after a bounded number of undelivered events, resumes when read again, and is cancelled after the stall limit.
Pure parts on the simulated router; the whole path over real gRPC with the gateway's channel options."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from gateway.upstream import BATCHER_CHANNEL_OPTIONS
from moemesh.serving import client_channel, serve_in_process
from moemesh.v1 import batcher_pb2_grpc, common_pb2
from services.batcher.__main__ import build
from services.batcher.backpressure import Backpressure, Limits
from services.batcher.config import BatcherConfig
from services.batcher.fairness import FairQueue
from services.batcher.sequence import Status
from services.batcher.servicer import BatcherServicer
from services.batcher.servicer import add_to_server as add_batcher
from services.router.__main__ import build_router
from services.router.config import RouterConfig
from services.router.servicer import add_to_server as add_router
from tests.services.batcher.mesh import request_for
from tests.services.batcher.sim import Clock, finals, ids, make, run_step, run_until_idle, seq

PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28]


def test_fair_queue_skips_held_sequences_and_counts_them_apart():
    q = FairQueue()
    a, b = seq("a"), seq("b")
    for s in (a, b):
        q.push(s)
    q.hold(a)
    assert (len(q), q.queued(a.tenant), q.held()) == (1, 1, 1)
    assert q.peek() is b and [s.seq_id for s in q.waiting()] == ["b"]
    q.pop(b)
    assert q.peek() is None
    q.release(a)
    assert (len(q), q.held()) == (1, 0) and q.peek() is a
    q.hold(a)
    q.discard(a)  # cancelled while parked: gone, counts untouched
    assert (len(q), q.held(), a.status) == (0, 0, Status.FINISHED)


def test_a_stream_parks_once_past_the_high_mark_and_stalls_only_without_progress():
    clock = Clock()
    bp = Backpressure(Limits(high=2, low=0, stall_s=10.0), clock)
    resumed: list[int] = []
    buf = bp.buffer(lambda: resumed.append(1))
    for i in range(3):
        buf.put_nowait(i)
        assert bp.should_park(buf) == (i == 2)
    assert not bp.should_park(buf) and bp.parks == 1  # once
    clock.advance(8.0)
    asyncio.run(buf.get())  # the client read one: progress, still parked (2 > low)
    clock.advance(5.0)  # 13 s parked, 5 s since the last read: a slow reader, not a stalled one
    assert bp.stalled({"s": buf}) == []
    clock.advance(6.0)
    assert bp.stalled({"s": buf}) == ["s"]
    for _ in range(2):
        asyncio.run(buf.get())
    assert resumed == [1] and buf.parked_at is None and bp.stalled({"s": buf}) == []
    with pytest.raises(ValueError, match="low"):
        Limits(high=4, low=4)


def test_a_parked_sequence_leaves_the_batch_and_recomputes_when_resumed():
    sched, router, clock = make()
    sched.add(seq("slow", max_tokens=8))
    sched.add(seq("fast", max_tokens=8))
    for _ in range(3):
        run_step(sched, router, clock)
    assert sched.park("slow")
    events = []
    for _ in range(20):
        plan, ev = run_step(sched, router, clock)
        events += ev
        assert plan is None or "slow" not in ids(plan)
    assert finals(events)["fast"].completion_tokens == 8
    assert "slow" not in router.cached  # its KV cache was released with the next plan
    sched.resume("slow")
    done = finals(run_until_idle(sched, router, clock))["slow"]
    assert done.completion_tokens == 8 and done.preemptions == 1


@contextlib.asynccontextmanager
async def batcher(model_dir, **knobs):
    """A real router and batcher on port 0; yields (engine loop, a Batcher stub on the gateway's channel options)."""
    router = await asyncio.to_thread(build_router, RouterConfig(model=str(model_dir), port=0, metrics_port=-1,
                                                                 kv_blocks=256, block_size=16))
    try:
        async with serve_in_process(lambda s: add_router(router.servicer, s), name="router") as r:
            loop, client = build(BatcherConfig(port=0, metrics_port=-1, router_addr=r.address, max_wait_ms=5.0,
                                               **knobs))
            loop.start()
            async with serve_in_process(lambda s: add_batcher(BatcherServicer(loop), s), name="batcher") as b:
                channel = client_channel(b.address, BATCHER_CHANNEL_OPTIONS)
                yield loop, batcher_pb2_grpc.BatcherStub(channel)
                await channel.close()
            await loop.stop()
            await client.close()
    finally:
        router.close()


async def _wait(predicate, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_a_stream_nobody_reads_is_parked_then_resumes_and_completes(tiny_moe_dir):
    async with batcher(tiny_moe_dir, stream_buffer=16) as (loop, stub):
        call = stub.Generate(request_for(PROMPT, 1500, "slow", request_id="slow"))
        await call.read()  # then nothing: its events pile up in the HTTP/2 window, then in its StreamBuffer
        await _wait(lambda: loop.backpressure.parks == 1)
        generated = len(loop.scheduler.get("slow").output_ids)
        # bounded: the 4 KiB window (~117 events of ~30 B) + the buffer's high mark + the step in flight
        assert generated < 300
        other = [e async for e in stub.Generate(request_for(PROMPT, 20, "fast"))]  # others run meanwhile
        assert other[-1].completion_tokens == 20
        # Parked, it got no step; a window update of the client's transport (here: when `fast` was read) lets
        # at most another window of events through, then it parks again.
        await _wait(lambda: loop.scheduler.queue.held() == 1 and not loop.scheduler.running)
        assert len(loop.scheduler.get("slow").output_ids) < generated + 300
        await asyncio.sleep(0.5)
        parked_at = len(loop.scheduler.get("slow").output_ids)
        await asyncio.sleep(0.5)
        assert len(loop.scheduler.get("slow").output_ids) == parked_at  # no step for it while parked
        tokens = 1 + sum([len(e.token_ids) async for e in call])  # reading again resumes it (recompute)
        assert tokens == 1500 and loop.scheduler.get("slow") is None


async def test_a_stream_parked_past_the_stall_limit_is_cancelled(tiny_moe_dir):
    async with batcher(tiny_moe_dir, stream_buffer=16, stall_s=1.0) as (loop, stub):
        call = stub.Generate(request_for(PROMPT, 1500, "slow", request_id="stalled"))
        await call.read()
        await _wait(lambda: loop.backpressure.parks == 1)
        await _wait(lambda: loop.scheduler.get("stalled") is None, seconds=5.0)
        events = [e async for e in call]
        assert events[-1].finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert events[-1].completion_tokens < 300
        assert loop.scheduler.queue.held() == 0 and not loop._streams
        with pytest.raises(grpc.aio.AioRpcError):  # the engine is fine: a bad request still gets its status
            await stub.Generate(request_for([], 4, "t")).read()
