"""In-flight prefix sharing (services/batcher/prefix_sharing.py) and short arrivals during a long prefill: the policy
on the scheduler with the simulated router (no sockets), then once over real gRPC with the router's prefix cache."""

from __future__ import annotations

import asyncio

import torch

from moemesh.runtime.types import SamplingParams
from services.batcher.planning import JOIN_STEP_SHARE
from services.batcher.prefix_sharing import PrefixSharing, Share
from tests.services.batcher.mesh import mesh
from tests.services.batcher.sim import ids, make, run_step, run_until_idle, seq

SYSTEM = list(range(100, 132))  # 8 blocks of 4


def ask(seq_id: str, tail: int, tenant: str = "t", **kw):
    s = seq(seq_id, max_tokens=2, tenant=tenant, **kw)
    s.prompt_ids = SYSTEM + [tail, tail + 1, tail + 2, tail + 3]  # 36 tokens: the system prompt + 1 block of its own
    return s


def items(plan) -> dict:
    return {i.seq.seq_id: i for i in plan.items}


def test_waiting_requests_join_once_the_shared_prefix_is_written_and_are_not_charged_for_it():
    sched, router, clock = make(block_size=4, max_step_tokens=16, max_batch_size=8)
    for k, name in enumerate("abc"):
        sched.add(ask(name, 10 * k))
    plans = []
    while not plans or "b" not in ids(plans[-1]):
        plans.append(run_step(sched, router, clock)[0])
        assert len(plans) < 10, "b never joined"
    assert [ids(p) for p in plans[:-1]] == [["a"], ["a"]]  # b and c waited while a fed the system prompt
    assert [items(p)["a"].position + len(items(p)["a"].token_ids) for p in plans[:-1]] == [16, 32]
    joined = items(plans[-1])
    assert sorted(joined) == ["a", "b", "c"]
    assert joined["b"].position == 0 and len(joined["b"].token_ids) == 36  # whole prompt: 32 of it expected hits
    assert plans[-1].tokens - 2 * 32 <= 16  # the hits are not charged to the step's token budget
    assert sched.sharing.holds == 2
    run_until_idle(sched, router, clock)


def test_other_tenants_and_other_salts_never_wait_on_a_prefix():
    sched, router, clock = make(block_size=4, max_step_tokens=128, max_batch_size=8)
    sched.add(ask("a", 0))
    sched.add(ask("other-tenant", 10, tenant="u"))
    sched.add(ask("other-salt", 20, cache_salt="s2"))
    sched.add(ask("same", 30))
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a", "other-tenant", "other-salt"]  # "same" waits for a's blocks
    plan, _ = run_step(sched, router, clock)
    assert "same" in ids(plan) and items(plan)["same"].position == 0


def test_a_held_request_does_not_block_the_ones_behind_it():
    sched, router, clock = make(block_size=4, max_step_tokens=48, max_batch_size=8)
    sched.add(ask("a", 0))
    sched.add(ask("b", 10))  # same prefix: held
    unrelated = seq("c", prompt_len=8, max_tokens=2, tenant="t")
    unrelated.prompt_ids = list(range(500, 508))
    sched.add(unrelated)
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["a", "c"]


def test_the_hold_is_bounded_in_time():
    sharing = PrefixSharing(block_size=4, hold_seconds=0.05)
    a, b = ask("a", 0), ask("b", 10)
    a.status, a.num_cached = a.status.RUNNING, 8  # a leader that stopped making progress
    assert sharing.look(b, [a], now=1.0).hold and sharing.hold_ends(1.0) == 1.05
    assert sharing.look(b, [a], now=1.04).hold
    assert sharing.look(b, [a], now=1.05) == Share(False, 8)  # joins, computing what is still missing
    assert sharing.hold_ends(1.05) is None
    sharing.joined("b")
    assert sharing.look(b, [a], now=2.0).hold  # held again later (after a preemption): a fresh bound
    assert PrefixSharing(4, hold_seconds=0).look(b, [a], now=0.0) == Share(False, 8)  # 0: never wait


def test_a_leader_that_leaves_releases_the_held_request():
    sched, router, clock = make(block_size=4, max_step_tokens=8, max_batch_size=8)
    sched.add(ask("a", 0))
    sched.add(ask("b", 10))
    run_step(sched, router, clock)
    sched.cancel("a")
    plan, _ = run_step(sched, router, clock)
    assert ids(plan) == ["b"] and plan.release == ["a"]


def test_expected_hits_count_only_blocks_already_written():
    sharing = PrefixSharing(block_size=4, hold_seconds=1.0)
    a, b = ask("a", 0), ask("b", 10)
    a.status = a.status.RUNNING
    a.num_cached = 22  # 5 of the 8 shared blocks written, the 6th half
    assert sharing.look(b, [a], now=0.0) == Share(True, 20)
    a.num_cached = 36
    assert sharing.look(b, [a], now=0.5) == Share(False, 32)  # the shared prefix only, not a's own block
    whole = ask("c", 0)  # a's very prompt: every block shared, but its last token must still be computed
    assert sharing.look(whole, [a], now=0.5) == Share(False, 32)
    assert sharing.look(ask("d", 0, tenant="u"), [a], now=0.5) == Share(False, 0)


def test_a_request_scoring_its_prompt_neither_waits_nor_counts_on_hits():
    from moemesh.v1 import common_pb2

    sharing = PrefixSharing(block_size=4, hold_seconds=1.0)
    a, b = ask("a", 0), ask("b", 10)
    a.status, a.num_cached = a.status.RUNNING, 20
    assert sharing.look(b, [a], now=0.0).hold
    for params in (common_pb2.SamplingParams(prompt_logprobs=0), SamplingParams(prompt_logprobs=2)):
        c = ask("c", 20)
        c.sampling = params  # the router computes a scored prompt whole (no hits)
        assert sharing.look(c, [a], now=0.0) == Share(False, 0)
    c.sampling = common_pb2.SamplingParams(max_tokens=3)
    assert sharing.look(c, [a], now=0.0).hold


def test_a_short_request_joins_at_once_during_a_long_prefill():
    sched, router, clock = make(block_size=4, max_step_tokens=32, max_batch_size=8)
    sched.add(seq("long", prompt_len=400, max_tokens=2))
    for _ in range(3):
        run_step(sched, router, clock)
    hi = seq("hi", prompt_len=5, max_tokens=2)
    hi.prompt_ids = [900, 901, 902, 903, 904]
    sched.add(hi)
    plan, events = run_step(sched, router, clock)
    hi = items(plan)["hi"]
    assert hi.sample and len(hi.token_ids) == 5  # its whole prompt in the next step: the first token comes out
    assert [e.token_ids for e in events if e.seq_id == "hi"] == [[1000]]
    assert 0 < len(items(plan)["long"].token_ids) <= 32 * JOIN_STEP_SHARE  # a short step: the first token comes soon
    plan, _ = run_step(sched, router, clock)
    long = items(plan)["long"]
    assert len(long.token_ids) >= 32 - 4 and (long.position + len(long.token_ids)) % 4 == 0  # full chunks again


def test_short_steps_only_when_a_long_prefill_would_fill_the_step():
    sched, router, clock = make(block_size=4, max_step_tokens=32, max_batch_size=8)
    sched.add(seq("a", prompt_len=40, max_tokens=2))
    run_step(sched, router, clock)
    hi = seq("hi", prompt_len=5, max_tokens=2)
    hi.prompt_ids = [900, 901, 902, 903, 904]
    sched.add(hi)
    plan, _ = run_step(sched, router, clock)
    assert [(i.seq.seq_id, len(i.token_ids)) for i in plan.items] == [("hi", 5), ("a", 8)]  # a's tail fits: no cut


async def test_concurrent_requests_with_one_prefix_compute_it_once(tiny_moe_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other workers: steady step times
    try:
        await _concurrent_requests(tiny_moe_dir)
    finally:
        torch.set_num_threads(before)


async def _concurrent_requests(tiny_moe_dir) -> None:
    system = [(7 * k) % 180 + 10 for k in range(48)]  # 3 blocks of 16
    prompts = {f"r{k}": system + [200 + k, 201 + k, 202 + k, 203 + k] for k in range(4)}
    async with mesh(tiny_moe_dir, kv_blocks=64, block_size=16, max_step_tokens=32, max_wait_ms=20.0) as m:
        tasks = {rid: m.generate(p, max_tokens=2, request_id=rid) for rid, p in prompts.items()}
        tasks["other"] = m.generate(system + [250, 251, 252, 253], max_tokens=2, tenant="u", request_id="other")
        results = dict(zip(tasks, await asyncio.gather(*tasks.values())))
        cached = {rid: r.events[-1].cached_tokens for rid, r in results.items()}
        same = sorted(cached[rid] for rid in prompts)
        assert same == [0, 48, 48, 48], cached  # the first computes the system prompt, the others hit it
        assert cached["other"] == 0  # never another tenant's blocks
        assert all(len(r.tokens) == 2 for r in results.values())
