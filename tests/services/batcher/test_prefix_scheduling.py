"""The real scheduler on the real engine's prefix cache (tiny model, in process): under KV pressure with shared
prompt prefixes, preemptions and cancels, the scheduler never plans a step the router refuses, every request ends
once, hits are reported for billing, and the view of free blocks matches the router's."""

from __future__ import annotations

import asyncio
import random

import pytest

from moemesh.runtime.engine import Engine
from services.batcher.kv_view import KvView
from services.batcher.local_router import LocalRouter
from services.batcher.policy import Policy
from services.batcher.scheduler import Scheduler
from services.batcher.sequence import Sequence
from tests.services.batcher.sim import Clock

SYSTEM = [7, 3, 9, 1, 4, 4, 2, 8, 6, 5, 3, 2, 9, 9, 1, 7]  # 4 blocks of 4


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from moemesh.builtin.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _run(engine_dir, seed: int, kv_blocks: int, mode: str = "continuous"):
    engine = Engine.load(engine_dir, kv_blocks=kv_blocks, block_size=4)
    router, clock = LocalRouter(engine), Clock()
    sched = Scheduler(Policy(mode=mode, max_batch_size=6, max_step_tokens=24, max_wait=0.0),
                      KvView(4, kv_blocks), engine.info.max_context, (), clock)
    rng, added, done = random.Random(seed), [], {}
    for k in range(40):
        if rng.random() < 0.6:
            tenant = rng.choice(["a", "b"])
            tail = [rng.randrange(10, 200) for _ in range(rng.randrange(1, 9))]
            name = f"s{k}"
            sched.add(Sequence(seq_id=name, prompt_ids=SYSTEM + tail, max_tokens=rng.randrange(1, 12), tenant=tenant,
                               ignore_eos=True))
            added.append(name)
        elif added and rng.random() < 0.2:
            sched.cancel(rng.choice(added))
        _turn(sched, router, clock, done)
    for _ in range(2000):
        if not sched.running and not len(sched.queue):
            break
        _turn(sched, router, clock, done)
    return sched, router, engine, added, done


def _turn(sched, router, clock, done) -> None:
    plan = sched.schedule()
    clock.advance(0.01)
    if plan is not None:
        sched.complete(plan, asyncio.run(router.step(plan)))
    else:
        asyncio.run(router.release(sched.take_releases()))
    for e in sched.take_events():
        if e.finish is not None:
            done[e.seq_id] = e


@pytest.mark.parametrize("seed, kv_blocks", [(1, 14), (3, 40)])
def test_scheduler_never_over_admits_with_shared_prefixes(engine_dir, seed, kv_blocks):
    sched, router, engine, added, done = _run(engine_dir, seed, kv_blocks)
    assert router.refusals == 0  # every planned step fit the router's KV cache
    assert sorted(done) == sorted(added)
    assert sum(e.cached_tokens for e in done.values()) > 0  # the shared system prompt was hit
    assert all(e.cached_tokens <= e.prompt_tokens for e in done.values())
    asyncio.run(router.release(sched.take_releases()))
    assert engine.info.active_sequences == 0 and engine.blocks.free_blocks == kv_blocks
    if kv_blocks == 14:
        assert sched.preemptions > 0  # pressure: shared blocks survived preemptions and came back
