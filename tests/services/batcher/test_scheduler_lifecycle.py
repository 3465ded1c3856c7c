"""Deadlines, cancellation, stop conditions, preemption under KV pressure, invalid requests, router refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batcher.sequence import Finish, Status
from services.batcher.step import InvalidRequest
from tests.services.batcher.sim import finals, ids, make, run_step, run_until_idle, seq


def test_deadline_passing_in_the_queue_drops_the_request_before_compute():
    sched, router, clock = make(max_batch_size=1)
    sched.add(seq("busy", max_tokens=10))
    sched.add(seq("late", deadline=clock.t + 0.05))
    events = []
    for _ in range(10):
        plan, ev = run_step(sched, router, clock, dt=0.01)
        events += ev
        assert plan is None or "late" not in ids(plan)
    done = finals(events)["late"]
    assert done.finish is Finish.DEADLINE and done.completion_tokens == 0 and done.engine_seconds == 0
    assert done.queue_seconds == pytest.approx(0.05, abs=0.011)


def test_deadline_passing_while_running_stops_compute_and_releases():
    sched, router, clock = make()
    sched.add(seq("s", max_tokens=100, deadline=clock.t + 0.035))
    events = []
    for _ in range(6):
        events += run_step(sched, router, clock, dt=0.01)[1]
    done = finals(events)["s"]
    assert done.finish is Finish.DEADLINE and 2 <= done.completion_tokens <= 4
    assert router.cached == {} and sched.kv.free == sched.kv.total


def test_cancel_while_waiting_and_while_running():
    sched, router, clock = make(max_batch_size=1)
    sched.add(seq("run", max_tokens=100))
    sched.add(seq("wait"))
    run_step(sched, router, clock)
    assert sched.cancel("wait") and not sched.cancel("nope")
    plan = sched.schedule()  # a step is in flight when the client cancels
    assert sched.cancel("run")
    sched.complete(plan, router.step(plan))  # its result is ignored
    events = sched.take_events()
    assert [(e.seq_id, e.finish) for e in events] == [("wait", Finish.CANCELLED), ("run", Finish.CANCELLED)]
    assert sched.schedule() is None and sched.take_releases() == ["run"]
    assert sched.kv.free == sched.kv.total and not sched.running and not len(sched.queue)


def test_eos_stop_ids_ignore_eos_and_context_limit():
    sched, router, clock = make(eos=(9,), max_context=8)
    router.eos = 9
    router.eos_after = {"eos": 1, "ign": 1}
    sched.add(seq("eos", max_tokens=5))
    sched.add(seq("ign", max_tokens=3, ignore_eos=True))
    sched.add(seq("stopid", max_tokens=5, stop_ids=frozenset({1001})))
    sched.add(seq("ctx", prompt_len=5, max_tokens=0))  # 0: until the context window is full
    done = finals(run_until_idle(sched, router, clock))
    assert (done["eos"].finish, done["eos"].completion_tokens) == (Finish.STOP, 2)
    assert (done["ign"].finish, done["ign"].completion_tokens) == (Finish.LENGTH, 3)
    assert (done["stopid"].finish, done["stopid"].completion_tokens) == (Finish.STOP, 2)
    assert (done["ctx"].finish, done["ctx"].completion_tokens) == (Finish.LENGTH, 3)  # 5 + 3 = max_context


def test_kv_exhaustion_preempts_the_lowest_priority_newest_and_recomputes_it():
    # 4 tokens per block, 6 blocks; three sequences growing to 12 tokens (3 blocks) each cannot all fit
    sched, router, clock = make(block_size=4, total_blocks=6, max_step_tokens=64)
    sched.add(seq("old", prompt_len=4, max_tokens=8))
    sched.add(seq("vip", prompt_len=4, max_tokens=8, priority=1))
    sched.add(seq("new", prompt_len=4, max_tokens=8))
    events = run_until_idle(sched, router, clock)
    done = finals(events)
    assert done["new"].preemptions >= 1 and done["vip"].preemptions == 0 and done["old"].preemptions == 0
    recompute = [i for p in router.steps for i in p.items if i.seq.seq_id == "new" and i.position == 0]
    assert len(recompute) == 1 + done["new"].preemptions
    assert len(recompute[-1].token_ids) > 4  # prompt + the tokens generated before preemption
    for name in ("old", "vip", "new"):  # output intact despite recompute
        assert [t for e in events if e.seq_id == name for t in e.token_ids] == [1000 + k for k in range(8)]
    assert sched.preemptions == sum(d.preemptions for d in done.values())


def test_a_sequence_larger_than_the_cache_ends_with_length_not_a_crash():
    sched, router, clock = make(block_size=4, total_blocks=2)
    sched.add(seq("big", prompt_len=4, max_tokens=100))
    done = finals(run_until_idle(sched, router, clock))["big"]
    assert done.finish is Finish.LENGTH and done.completion_tokens == 5  # 8 tokens fill both blocks


def test_invalid_requests_name_the_field():
    sched, router, clock = make(max_context=16, block_size=4, total_blocks=3)
    with pytest.raises(InvalidRequest, match="prompt_ids.*0"):
        sched.add(seq("empty", prompt_len=0))
    with pytest.raises(InvalidRequest, match="context window is 16"):
        sched.add(seq("long", prompt_len=16))
    with pytest.raises(InvalidRequest, match="KV blocks"):
        sched.add(seq("huge", prompt_len=12))
    sched.add(seq("dup"))
    with pytest.raises(InvalidRequest, match="already"):
        sched.add(seq("dup"))


def test_router_refusal_undoes_the_step_and_makes_room():
    sched, router, clock = make(block_size=4, total_blocks=100)
    for name in "abc":
        sched.add(seq(name, max_tokens=50))
    run_step(sched, router, clock)
    plan = sched.schedule()
    sched.abort(plan, kv_blocks_free=2)  # the router has less room than the ledger thought
    assert sched.kv.reported == 2 and [s.seq_id for s in sched.running] == ["a", "b"]
    assert sched.get("c").status is Status.WAITING and sched.get("c").num_cached == 0
    assert sched.take_releases() == ["c"]


def test_router_failure_ends_the_steps_sequences_with_error():
    sched, router, clock = make()
    sched.add(seq("a"))
    plan = sched.schedule()
    sched.fail(plan, "router unavailable")
    (event,) = sched.take_events()
    assert event.finish is Finish.ERROR and "unavailable" in event.detail
    assert sched.take_releases() == ["a"] and sched.kv.free == sched.kv.total


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(0, 6)), min_size=1, max_size=40),
    mode=st.sampled_from(["none", "static", "dynamic", "continuous"]),
    blocks=st.integers(8, 40),
)
def test_any_mix_of_arrivals_cancels_and_pressure_drains_cleanly(ops, mode, blocks):
    sched, router, clock = make(mode=mode, block_size=4, total_blocks=blocks, max_batch_size=4, max_step_tokens=16)
    added, finished = [], []
    for k, (op, size, extra) in enumerate(ops):
        if op == 0 and added:
            sched.cancel(added[size % len(added)])
        else:
            name = f"s{k}"
            try:
                sched.add(seq(name, prompt_len=size, max_tokens=extra, priority=op, tenant=f"t{extra % 2}"))
                added.append(name)
            except InvalidRequest:
                pass
        events = run_step(sched, router, clock)[1]
        router.release(sched.take_releases())  # what the engine loop does when it goes idle
        assert sched.kv.free == router.total_blocks - router.used()  # the view is the router's truth
        finished += [e.seq_id for e in events if e.finish]
        assert not set(finished) & {s.seq_id for s in sched.running}
    finished += [e.seq_id for e in run_until_idle(sched, router, clock) if e.finish]
    assert sorted(finished) == sorted(added)  # every request ends exactly once
    assert router.cached == {} and sched.kv.free == sched.kv.total
    assert not sched.running and not len(sched.queue)
