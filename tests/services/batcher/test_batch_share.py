"""Per-tenant shares of the running batch: while another tenant is active, a tenant's backlog is not admitted past
its weighted share of the slots (rounded up); alone it may fill the batch; parked sequences do not count; a tenant
that just went idle keeps its share for IDLE_GRACE_S. Pure parts on the simulated router; one test over real gRPC."""

from __future__ import annotations

import asyncio

from services.batcher.fairness import IDLE_GRACE_S, FairQueue
from tests.services.batcher.mesh import request_for
from tests.services.batcher.sim import Clock, make, run_step, seq
from tests.services.batcher.test_backpressure import PROMPT, _wait, batcher


def running(sched, tenant: str) -> int:
    return sum(s.tenant == tenant for s in sched.running)


def test_a_backlog_is_held_to_its_share_while_another_tenant_is_active():
    sched, router, clock = make(max_batch_size=8, max_step_tokens=256, max_queue=1000)
    sched.add(seq("B0", max_tokens=40, tenant="B"))
    for i in range(100):
        sched.add(seq(f"A{i}", max_tokens=40, tenant="A"))
    for _ in range(20):
        plan, _ = run_step(sched, router, clock)
        # A's share of 8 slots next to B is 4: the batch holds 5, not 8 (smaller steps for B)
        assert running(sched, "A") <= 4 and len(plan.items) <= 5
    assert running(sched, "A") == 4 and running(sched, "B") == 1
    assert sched.preemptions == 0  # held back at admission, nobody was preempted


def test_alone_a_tenant_fills_the_batch_and_weights_set_the_caps():
    sched, router, clock = make(max_batch_size=6, max_step_tokens=256, max_queue=1000)
    for i in range(20):
        sched.add(seq(f"A{i}", max_tokens=40, tenant="A", weight=2.0))
    run_step(sched, router, clock)
    assert running(sched, "A") == 6
    q = FairQueue()
    for i in range(3):
        q.push(seq(f"A{i}", tenant="A", weight=2.0))
        q.push(seq(f"B{i}", tenant="B", weight=1.0))
    assert (q.cap("A", 6), q.cap("B", 6)) == (4, 2)
    assert q.cap("A", 1) == 1  # at least one slot each, however small the share


def test_parked_sequences_do_not_hold_their_tenants_share():
    sched, router, clock = make(max_batch_size=4, max_step_tokens=256, max_queue=1000)
    for i in range(2):
        sched.add(seq(f"A{i}", max_tokens=400, tenant="A"))
    run_step(sched, router, clock)
    for i in range(2):
        sched.park(f"A{i}")  # their clients stopped reading
    clock.advance(IDLE_GRACE_S)
    for i in range(6):
        sched.add(seq(f"B{i}", max_tokens=40, tenant="B"))
    run_step(sched, router, clock)
    assert running(sched, "B") == 4  # A, only parked, is not active: B gets every slot
    sched.resume("A0")  # A reads again: active, so B is held to 2 of 4 slots from now on
    for _ in range(60):
        run_step(sched, router, clock)
        assert running(sched, "B") <= 4
    assert running(sched, "A") == 1 and running(sched, "B") == 2


def test_an_idle_tenant_keeps_its_share_for_the_grace_only():
    clock = Clock()
    q = FairQueue(clock)
    b = seq("B0", tenant="B")
    q.push(b)
    q.push(seq("A0", tenant="A"))
    q.pop(b)
    q.left_batch(b)  # B's last request is done
    assert q.cap("A", 8) == 4
    clock.advance(IDLE_GRACE_S)
    assert q.cap("A", 8) == 8


async def test_over_grpc_a_flood_of_streams_keeps_to_its_share_of_the_batch(tiny_moe_dir):
    async with batcher(tiny_moe_dir, max_batch_size=4) as (loop, stub):
        await loop.wait_ready()
        light = asyncio.ensure_future(_read_all(stub.Generate(request_for(PROMPT, 80, "light"))))
        await _wait(lambda: loop.scheduler.queue.running("light") == 1)
        flood = [asyncio.ensure_future(_read_all(stub.Generate(request_for(PROMPT, 30, "flood"))))
                 for _ in range(8)]
        most = 0
        while not light.done():
            most = max(most, loop.scheduler.queue.running("flood"))
            await asyncio.sleep(0.005)
        assert await light == 80
        assert most == 2  # 2 of 4 slots while `light` ran (the batch had 3 sequences, not 4)
        assert await asyncio.gather(*flood) == [30] * 8  # then the flood finishes, alone


async def _read_all(call) -> int:
    return sum([len(e.token_ids) async for e in call])
