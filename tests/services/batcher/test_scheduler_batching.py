"""Continuous batching, chunked prefill, max_wait and the four modes, on an injected clock."""

from __future__ import annotations

from services.batcher.sequence import Finish
from tests.services.batcher.sim import finals, ids, make, run_step, run_until_idle, seq


def test_sequences_join_and_leave_at_every_step():
    sched, router, clock = make()
    sched.add(seq("a", max_tokens=3))
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a"] and plan.items[0].token_ids == [1, 2, 3, 4] and plan.items[0].sample

    sched.add(seq("b", max_tokens=3))  # joins the running batch at the next step
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a", "b"]
    a = plan.items[0]
    assert (a.position, a.token_ids) == (4, [1000])  # decode feeds the last sampled token

    plan, events = run_step(sched, router, clock)  # a samples its 3rd token and leaves
    assert ids(plan) == ["a", "b"] and finals(events)["a"].finish is Finish.LENGTH
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["b"] and plan.release == ["a"]  # released in the router before the step
    assert "a" not in sched.kv.own


def test_chunked_prefill_keeps_decodes_flowing_under_the_token_budget():
    sched, router, clock = make(max_step_tokens=8, max_batch_size=4)
    for name in "abc":
        sched.add(seq(name, prompt_len=2, max_tokens=50))
    run_step(sched, router, clock)  # the three prefills
    sched.add(seq("long", prompt_len=20, max_tokens=2))
    chunks = []
    for _ in range(5):
        plan, _ = run_step(sched, router, clock)
        assert plan.tokens <= 8
        assert ids(plan)[:3] == ["a", "b", "c"]  # every decode, every step
        long = [i for i in plan.items if i.seq.seq_id == "long"]
        if long:
            chunks.append((long[0].position, len(long[0].token_ids), long[0].sample))
    # 20 prompt tokens in chunks of 8 - 3 decodes = 5; only the last chunk samples; then decodes of 1
    assert chunks[:4] == [(0, 5, False), (5, 5, False), (10, 5, False), (15, 5, True)]
    assert chunks[4] == (20, 1, True)


def test_dynamic_mode_prefills_whole_prompts_in_one_step():
    sched, router, clock = make(mode="dynamic", max_step_tokens=8, max_batch_size=4)
    sched.add(seq("a", prompt_len=2, max_tokens=50))
    run_step(sched, router, clock)
    sched.add(seq("long", prompt_len=20, max_tokens=2))
    plan, _ = run_step(sched, router, clock)
    assert [(i.seq.seq_id, len(i.token_ids)) for i in plan.items] == [("a", 1), ("long", 20)]


def test_max_wait_gathers_a_burst_when_idle_then_flushes():
    sched, router, clock = make(max_wait=0.1, max_batch_size=4)
    sched.add(seq("a"))
    assert sched.schedule() is None and sched.wake_at == clock.t + 0.1
    clock.advance(0.05)
    sched.add(seq("b"))
    assert sched.schedule() is None and abs(sched.wake_at - (clock.t + 0.05)) < 1e-9  # measured from the oldest
    clock.advance(0.05)
    plan = sched.schedule()
    assert ids(plan) == ["a", "b"]  # one shared prefill step


def test_max_wait_does_not_delay_a_full_batch_or_a_busy_engine():
    sched, router, clock = make(max_wait=0.1, max_batch_size=2)
    sched.add(seq("a", max_tokens=10))
    sched.add(seq("b", max_tokens=10))
    assert ids(sched.schedule()) == ["a", "b"]  # full: no waiting


def test_busy_engine_admits_arrivals_without_waiting():
    sched, router, clock = make(max_wait=0.1, max_batch_size=4)
    sched.add(seq("a", max_tokens=10))
    clock.advance(0.1)
    run_step(sched, router, clock)
    sched.add(seq("b"))
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a", "b"]


def test_decode_batch_is_capped_at_max_batch_size():
    sched, router, clock = make(max_batch_size=3)
    for i in range(5):
        sched.add(seq(f"s{i}", max_tokens=2))
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["s0", "s1", "s2"] and len(sched.queue) == 2
    plan, _ = run_step(sched, router, clock)  # s0..s2 finish after this step (2 tokens)
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["s3", "s4"]


def test_static_mode_runs_a_batch_to_completion_without_joins():
    sched, router, clock = make(mode="static", max_wait=0.1, max_batch_size=2)
    sched.add(seq("a", max_tokens=3))
    assert sched.schedule() is None  # waits for a full batch or max_wait
    sched.add(seq("b", max_tokens=1))
    sched.add(seq("c", max_tokens=1))
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a", "b"]
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a"]  # b left; c may not join the running batch
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a"]
    clock.advance(0.1)
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["c"]


def test_none_mode_serves_one_request_at_a_time():
    sched, router, clock = make(mode="none", max_wait=0.1)
    for name in "abc":
        sched.add(seq(name, max_tokens=2))
    seen = [ids(p) for p in (run_step(sched, router, clock)[0] for _ in range(6))]
    assert seen == [["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]


def test_engine_seconds_split_by_tokens_in_each_step():
    sched, router, clock = make()
    sched.add(seq("a", prompt_len=3, max_tokens=1))
    sched.add(seq("b", prompt_len=1, max_tokens=1))
    _, events = run_step(sched, router, clock, dt=0.4)  # 4 tokens in the step: a 3/4, b 1/4
    done = finals(events)
    assert abs(done["a"].engine_seconds - 0.3) < 1e-9 and abs(done["b"].engine_seconds - 0.1) < 1e-9


def test_every_request_ends_once_with_its_tokens():
    sched, router, clock = make(max_batch_size=4, max_step_tokens=16)
    for i in range(10):
        sched.add(seq(f"s{i}", prompt_len=1 + 7 * i % 23, max_tokens=1 + i % 4))
    events = run_until_idle(sched, router, clock)
    done = finals(events)
    assert len(done) == 10 and len([e for e in events if e.finish]) == 10
    for i in range(10):
        toks = [t for e in events if e.seq_id == f"s{i}" for t in e.token_ids]
        assert toks == [1000 + k for k in range(1 + i % 4)]
    assert router.cached == {} and sched.kv.free == sched.kv.total
