"""Weighted fair queuing across tenants, priorities within a tenant, and the bounded queue."""

from __future__ import annotations

import pytest

from services.batcher.fairness import IDLE_GRACE_S
from services.batcher.step import QueueFull
from tests.services.batcher.sim import ids, make, run_step, run_until_idle, seq


def admitted_order(sched, router, clock, steps: int) -> list[str]:
    order: list[str] = []
    for _ in range(steps):
        plan, _ = run_step(sched, router, clock)
        if plan:
            order += [i.seq.seq_id for i in plan.items if i.position == 0]
    return order


def test_a_flood_from_one_tenant_does_not_starve_another():
    sched, router, clock = make(max_batch_size=4, max_step_tokens=64)
    for i in range(100):
        sched.add(seq(f"A{i}", max_tokens=4, tenant="A"))
    run_step(sched, router, clock)
    run_step(sched, router, clock)
    for i in range(5):
        sched.add(seq(f"B{i}", max_tokens=4, tenant="B"))
    order = admitted_order(sched, router, clock, 40)
    b_slots = [k for k, name in enumerate(order) if name.startswith("B")]
    # B arrived behind 96 queued A requests, yet its 5 requests take every other free slot
    assert len(b_slots) == 5 and b_slots[-1] < 12


def test_a_full_batch_gives_slots_to_a_tenant_below_its_share():
    sched, router, clock = make(max_batch_size=4, max_step_tokens=64)
    for i in range(8):
        sched.add(seq(f"A{i}", max_tokens=50, tenant="A"))
    run_step(sched, router, clock)  # A0..A3 fill the batch
    sched.add(seq("B0", max_tokens=2, tenant="B"))
    sched.add(seq("B1", max_tokens=2, tenant="B"))
    plan, _ = run_step(sched, router, clock)
    assert sorted(ids(plan)) == ["A0", "A1", "B0", "B1"]  # B's share is 2 of 4 slots: A's two newest step aside
    assert plan.release == ["A3", "A2"] and sched.get("A3").preemptions == 1
    run_step(sched, router, clock)
    plan, _ = run_step(sched, router, clock)  # B done, but counts as active for IDLE_GRACE_S: A keeps its 2 slots
    assert ids(plan) == ["A0", "A1"]
    clock.advance(IDLE_GRACE_S)
    plan, _ = run_step(sched, router, clock)  # then A's preempted ones come back first, recomputed
    assert ids(plan) == ["A0", "A1", "A2", "A3"] and plan.items[2].position == 0


def test_shares_below_one_slot_never_preempt():
    sched, router, clock = make(max_batch_size=4, max_step_tokens=64)
    for i in range(24):  # 6 tenants over 4 slots: 2/3 of a slot each
        sched.add(seq(f"s{i}", max_tokens=3, tenant=f"t{i % 6}"))
    run_until_idle(sched, router, clock)
    assert sched.preemptions == 0


def test_weights_share_tokens_between_backlogged_tenants():
    sched, router, clock = make(max_batch_size=3, max_step_tokens=64, max_queue=1000)
    for i in range(100):  # more than 150 steps can serve: both stay backlogged
        sched.add(seq(f"A{i}", prompt_len=4, max_tokens=4, tenant="A", weight=2.0))
        sched.add(seq(f"B{i}", prompt_len=4, max_tokens=4, tenant="B", weight=1.0))
    for _ in range(150):
        run_step(sched, router, clock)
    served_a = sched.queue.counter("A") * 2.0
    served_b = sched.queue.counter("B") * 1.0
    assert 1.6 < served_a / served_b < 2.5  # about 2:1, within one request's tokens of granularity


def test_an_idle_tenant_banks_no_credit():
    sched, router, clock = make(max_batch_size=2, max_step_tokens=64)
    for i in range(20):  # A is served alone for a long time while B is idle, then A goes idle too
        sched.add(seq(f"A{i}", tenant="A", max_tokens=4))
    run_until_idle(sched, router, clock)
    for i in range(20):
        sched.add(seq(f"B{i}", tenant="B", max_tokens=4))
    sched.add(seq("A-late", tenant="A", max_tokens=4))
    order = admitted_order(sched, router, clock, 30)
    # B starts from A's counter, not from 0: A's next request is not pushed behind all 20 of B's
    assert order.index("A-late") < 6


def test_priority_orders_requests_within_a_tenant():
    sched, router, clock = make(max_batch_size=1)
    sched.add(seq("low", tenant="t", priority=0, max_tokens=1))
    sched.add(seq("high", tenant="t", priority=5, max_tokens=1))
    sched.add(seq("mid", tenant="t", priority=2, max_tokens=1))
    assert admitted_order(sched, router, clock, 3) == ["high", "mid", "low"]


def test_full_queue_rejects_with_a_retry_after_hint():
    sched, router, clock = make(max_queue=3, max_batch_size=1, retry_after_min=0.05, retry_after_max=5.0)
    for i in range(3):
        sched.add(seq(f"s{i}"))
    with pytest.raises(QueueFull) as err:
        sched.add(seq("s3"))
    assert 0.05 <= err.value.retry_after <= 5.0 and "queue full" in str(err.value)
    assert len(sched.queue) == 3 and sched.get("s3") is None
    run_step(sched, router, clock)  # s0 admitted: room again
    sched.add(seq("s3"))


def test_retry_after_follows_the_admission_rate():
    sched, router, clock = make(max_queue=4, max_batch_size=1, retry_after_max=60.0)
    for i in range(4):
        sched.add(seq(f"s{i}", max_tokens=1))
    for k in range(4, 12):  # one admission per 0.5 s: 2 per second
        run_step(sched, router, clock, dt=0.5)
        sched.add(seq(f"s{k}", max_tokens=1))
    with pytest.raises(QueueFull) as err:
        sched.add(seq("late"))
    assert 1.0 <= err.value.retry_after <= 4.0  # 4 queued at ~2/s: about 2 s


def test_per_tenant_queue_bound_leaves_room_for_others():
    sched, router, clock = make(max_queue=10, max_queue_per_tenant=3)
    for i in range(3):
        sched.add(seq(f"A{i}", tenant="A"))
    with pytest.raises(QueueFull, match="tenant 'A'"):
        sched.add(seq("A3", tenant="A"))
    sched.add(seq("B0", tenant="B"))
    assert ids(sched.schedule())[:4] == ["A0", "B0", "A1", "A2"]
