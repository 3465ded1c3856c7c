"""Step pipelining (services/batcher/lookahead.py) on a real batcher and a real router (tiny MoE) over gRPC: the next
decode step is on its way before the previous result is back, and nothing a client sees changes: greedy tokens are
the same token for token as without pipelining, stop ids and max_tokens end the stream exactly, usage counts only
delivered tokens, preemption still recomputes, and the router frees every sequence's KV cache."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh.runtime.engine import Engine
from moemesh.runtime.types import SamplingParams, SequenceStateError, SequenceWork
from moemesh.v1 import common_pb2, router_pb2
from services.batcher.lookahead import plan_ahead, settle
from services.batcher.sequence import Finish, Sequence
from tests.services.batcher.mesh import mesh, request_for
from tests.services.batcher.sim import make, seq

PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28]


class Overlap:
    """Wraps the loop's router port: counts pipelined works and the most Step calls in flight at once."""

    def __init__(self, port) -> None:
        self.port, self.address = port, port.address
        self.in_flight = self.most = self.follows = 0

    async def step(self, plan):
        self.follows += sum(i.follows for i in plan.items)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            return await self.port.step(plan)
        finally:
            self.in_flight -= 1

    def __getattr__(self, name):
        return getattr(self.port, name)


async def _run(model_dir, pipeline: bool, requests, **knobs):
    """Token lists and last events of `requests` (prompt, max_tokens, stop id or None), all at once."""
    async with mesh(model_dir, pipeline=pipeline, **knobs) as m:
        m.loop.router = probe = Overlap(m.loop.router)
        streams = await asyncio.gather(*(_collect(m, r) for r in _requests(requests)))
        info = await m.router_info()
        assert info.active_sequences == 0 and info.kv_blocks_free == info.kv_blocks_total
    return [[t for e in s for t in e.token_ids] for s in streams], [s[-1] for s in streams], probe


def _requests(requests):
    for i, (prompt, max_tokens, stop) in enumerate(requests):
        req = request_for(prompt, max_tokens, f"t{i % 2}")
        if stop is not None:
            req.sampling.stop_token_ids.append(stop)
        yield req


async def _collect(m, req):
    return [e async for e in m.batcher.Generate(req)]


async def test_pipelined_greedy_tokens_stops_and_usage_match_unpipelined(tiny_moe_dir):
    plain, _, _ = await _run(tiny_moe_dir, False, [(PROMPT, 12, None)])
    stop = plain[0][4]  # greedy is deterministic: this id ends a stream at its first occurrence
    requests = [(PROMPT, 12, None), (PROMPT, 12, stop), (PROMPT[:5], 7, None), (PROMPT[2:], 1, None),
                (PROMPT + [7, 8, 9], 20, None)]
    off, off_last, off_probe = await _run(tiny_moe_dir, False, requests)
    on, on_last, on_probe = await _run(tiny_moe_dir, True, requests)
    assert on == off and on[0] == plain[0]
    assert on[1] == plain[0][: plain[0].index(stop) + 1]  # nothing past the stop id reaches the client
    assert [len(t) for t in on] == [12, len(on[1]), 7, 1, 20]
    for tokens, last in zip(on, on_last):  # usage counts the delivered tokens only
        assert last.completion_tokens == len(tokens)
    assert [e.finish_reason for e in on_last] == [e.finish_reason for e in off_last]
    assert on_last[1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert off_probe.follows == 0 and off_probe.most == 1
    assert on_probe.follows > 0 and on_probe.most == 2  # the next step was sent while one ran


async def test_preemption_under_a_small_kv_cache_gives_the_same_tokens_pipelined(tiny_moe_dir):
    requests = [(PROMPT, 40, None)] * 4  # 4 x 48 tokens in 6 blocks of 16: some must be preempted
    off, off_last, _ = await _run(tiny_moe_dir, False, requests, kv_blocks=6, max_step_tokens=64)
    on, on_last, probe = await _run(tiny_moe_dir, True, requests, kv_blocks=6, max_step_tokens=64)
    assert on == off and all(len(t) == 40 for t in on)
    assert sum(e.preemptions for e in on_last) >= 1 and probe.follows > 0


def test_engine_follow_feeds_its_last_sampled_token(tiny_moe_dir):
    engine = Engine.load(tiny_moe_dir, kv_blocks=16)
    greedy = SamplingParams(max_tokens=8)
    first = engine.step([SequenceWork("a", PROMPT, 0, greedy), SequenceWork("b", PROMPT, 0, greedy)])[0].token_id
    followed = engine.step([SequenceWork("a", [], len(PROMPT), None, follows=True)])[0].token_id
    explicit = engine.step([SequenceWork("b", [first], len(PROMPT), None)])[0].token_id
    assert followed == explicit and engine.cached_length("a") == len(PROMPT) + 1
    with pytest.raises(SequenceStateError, match="'c'.*unknown"):
        engine.step([SequenceWork("c", [], 0, None, follows=True)])
    engine.step([SequenceWork("d", PROMPT[:4], 0, greedy, sample=False)])
    with pytest.raises(SequenceStateError, match="'d'.*sampled no token"):
        engine.step([SequenceWork("d", [], 4, None, follows=True)])


def _pipelined(sched, router, plan, ahead):
    """Completes `plan` with `ahead` in flight, as the engine loop does: complete, settle, then run `ahead`."""
    sched.complete(plan, router.step(plan))
    settle(sched, ahead)
    return router.step(ahead)


def test_plan_ahead_follows_decodes_and_skips_a_step_that_surely_ends():
    sched, router, clock = make(block_size=4, total_blocks=16)
    sched.add(seq("a", prompt_len=4, max_tokens=2))
    sched.add(Sequence("b", prompt_ids=[9, 8, 7, 6], max_tokens=20))  # another prompt: admitted at once
    first = sched.schedule()  # both prefill and sample
    ahead = plan_ahead(sched, first, clock())
    assert [(i.seq.seq_id, i.position, i.follows, i.token_ids) for i in ahead.items] == [
        ("a", 4, True, []), ("b", 4, True, [])]
    assert ahead.step_id == first.step_id + 1 and sched.kv.claimed == 4  # 2 prefill blocks + 2 at position 4
    outcome = _pipelined(sched, router, first, ahead)
    assert [i.token_ids for i in ahead.items] == [[sched.get(x).output_ids[-1]] for x in "ab"]
    assert sched.kv.claimed == 2  # the report of `first` reset the claims: ahead's were taken again
    second = plan_ahead(sched, ahead, clock())
    assert [i.seq.seq_id for i in second.items] == ["b"]  # a's token in `ahead` is its last (2 of 2)
    sched.complete(ahead, outcome)
    settle(sched, second)
    sched.complete(second, router.step(second))
    assert sched.get("a") is None and len(sched.get("b").output_ids) == 3
    assert second.release == [] and sched.take_releases() == ["a"]


def test_plan_ahead_drains_when_a_decode_needs_a_kv_block_or_a_request_waits():
    sched, router, clock = make(block_size=4, total_blocks=2)
    sched.add(seq("a", prompt_len=4, max_tokens=50))
    plan = sched.schedule()
    outcome, ahead = router.step(plan), plan_ahead(sched, plan, clock())
    while ahead is not None:  # as the engine loop: the next step is planned before this one's result is in
        sched.complete(plan, outcome)
        settle(sched, ahead)
        plan, outcome = ahead, router.step(ahead)
        ahead = plan_ahead(sched, plan, clock())
    sched.complete(plan, outcome)
    assert plan.items[0].position == 7  # positions 4..7 fit in the 2nd block; position 8 needs a 3rd: drain
    assert len(sched.get("a").output_ids) == 5

    sched, router, clock = make()
    sched.add(seq("a", max_tokens=50))
    plan = sched.schedule()
    sched.add(Sequence("c", prompt_ids=[7, 7], max_tokens=5))
    assert plan_ahead(sched, plan, clock()) is None  # c waits for admission: the scheduler plans the next step
    sched.complete(plan, router.step(plan))
    assert [i.seq.seq_id for i in sched.schedule().items] == ["a", "c"]


def test_a_sequence_cancelled_while_its_steps_are_in_flight_gets_no_more_tokens():
    sched, router, clock = make()
    sched.add(seq("a", max_tokens=50))
    plan = sched.schedule()
    ahead = plan_ahead(sched, plan, clock())
    sched.cancel("a")
    sched.complete(plan, router.step(plan))
    settle(sched, ahead)
    sched.complete(ahead, router.step(ahead))
    events = sched.take_events()
    assert [(e.seq_id, e.token_ids, e.finish) for e in events] == [("a", [], Finish.CANCELLED)]
    assert ahead.items[0].token_ids == [] and sched.take_releases() == ["a"]


async def test_the_router_runs_a_following_step_after_its_predecessor_even_when_it_arrives_first(tiny_moe_dir):
    def work(seq_id, tokens, position, follows=False):
        return router_pb2.SequenceWork(seq_id=seq_id, token_ids=tokens, position=position, sample=True,
                                       follows=follows)

    async with mesh(tiny_moe_dir) as m:
        n = len(PROMPT)
        follow = asyncio.ensure_future(m.router.Step(router_pb2.StepRequest(step_id=1002, work=[work("x", [], n, 1)])))
        await asyncio.sleep(0.01)  # the following step reaches the router first: it waits for step 1001
        first = await m.router.Step(router_pb2.StepRequest(step_id=1001, work=[work("x", PROMPT, 0)]))
        followed = (await follow).results[0].token_id
        await m.router.Step(router_pb2.StepRequest(step_id=1003, work=[work("y", PROMPT, 0)]))
        explicit = await m.router.Step(router_pb2.StepRequest(step_id=1004, work=[
            work("y", [first.results[0].token_id], n)]))
        assert followed == explicit.results[0].token_id
        with pytest.raises(grpc.aio.AioRpcError) as err:  # nothing sampled for an unknown sequence
            await m.router.Step(router_pb2.StepRequest(step_id=1005, work=[work("z", [], 0, True)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'z'" in err.value.details()
        await m.router.Release(router_pb2.ReleaseRequest(seq_ids=["x", "y"]))
