"""Step pipelining (as vLLM's async scheduling does): while step N runs on the router, the batcher already sends
step N+1 for the sequences that go on decoding, each work marked `follows`: the router feeds the token it sampled for
that sequence in step N, which the batcher does not know yet. The router's engine thread then goes from one step
to the next without waiting for the round trip (result -> batcher -> plan -> router: 3-4 ms a step on 2 cores).

    send N;  ahead = plan_ahead(N);  send ahead (it waits at the router behind N)
    N's result -> scheduler.complete(N) -> settle(ahead): its works get their token, its KV claims are re-taken
    a sequence that finished in N (eos, stop id, max tokens, cancel, deadline) is no longer running, so
    scheduler.complete(ahead) skips it: its extra token is never delivered nor billed; its KV blocks are released
    with the next plan, which the router's single engine thread applies after `ahead` ran.

Only pure decode steps are planned ahead, and only while nothing waits for admission, every running sequence decodes
in the previous step and every decode fits in the KV cache without a preemption; otherwise the pipeline drains (the
step in flight completes) and the scheduler plans the next step as usual, from settled state. When step N fails,
`ahead` cannot have been applied (its positions are one past N's, which the router rolled back): it is dropped.
Greedy outputs are therefore the same token for token with and without pipelining.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from services.batcher.scheduler import Scheduler
from services.batcher.sequence import Sequence, Status
from services.batcher.step import SequenceWork, StepOutcome, StepPlan

if TYPE_CHECKING:
    from services.batcher.engine_loop import EngineLoop

log = logging.getLogger(__name__)
_RELEASING: set[asyncio.Future] = set()


async def drive(loop: EngineLoop, plan: StepPlan, call: asyncio.Future[StepOutcome]) -> None:
    """Completes `plan` (its Step call already sent) and, while plan_ahead allows, keeps one step queued at the
    router behind the one running. Returns when the pipeline has drained (nothing of this turn in flight)."""
    scheduler, ahead_call = loop.scheduler, None
    try:
        while True:
            ahead = plan_ahead(scheduler, plan, loop.clock()) if loop.pipeline and not loop._stopping else None
            if ahead is None and plan.items[0].follows:
                _release_early(loop)
            ahead_call = await loop._send(ahead) if ahead is not None else None
            if not await loop._step(plan, call) or ahead is None:
                break
            settle(scheduler, ahead)
            loop._deliver()
            plan, call, ahead_call = ahead, ahead_call, None
    except asyncio.CancelledError:
        if ahead_call is not None:
            ahead_call.cancel()
        raise
    if ahead_call is not None:  # it follows a step that was not applied: the router refuses it too; drop it
        await asyncio.gather(ahead_call, return_exceptions=True)


def _release_early(loop: EngineLoop) -> None:
    """Draining: the sequences that finished in the last completed step leave the router now (the Release waits
    on the router's engine thread behind the step in flight, which follows them), not one turn later. Their blocks
    count as free again from the first router report taken after the Release (the ledger is conservative until
    then), so the Release's own answer is not needed."""
    ids = loop.scheduler.take_releases()
    if ids:
        task = asyncio.ensure_future(loop.router.release(ids))
        _RELEASING.add(task)  # the event loop keeps only a weak reference to a task
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future) -> None:
    _RELEASING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("release of finished sequences failed: %s", task.exception())


def plan_ahead(scheduler: Scheduler, prev: StepPlan, now: float) -> StepPlan | None:
    """The next step's plan while `prev` is still running, or None (drain: let the scheduler decide)."""
    if len(scheduler.queue):  # someone waits for admission (or a preempted sequence for recompute)
        return None
    sampled = {i.seq.seq_id for i in prev.items if i.sample and i.seq.status is Status.RUNNING}
    if any(s.seq_id not in sampled for s in scheduler.running):  # a prefill chunk, or a decode left out
        return None
    if any(s.deadline is not None and s.deadline <= now for s in scheduler.running):
        return None  # the scheduler expires it
    items = [SequenceWork(seq=i.seq, token_ids=[], position=i.position + len(i.token_ids), sample=True, follows=True)
             for i in prev.items if i.seq.seq_id in sampled and not _ends_after_next(i.seq, scheduler.max_context)]
    kv = scheduler.kv
    if not items or sum(kv.extra(i.position, i.position + 1) for i in items) > kv.free:
        return None  # nothing goes on, or a decode needs blocks the scheduler must make room for
    for item in items:
        kv.take(item.position, item.position + 1)
        scheduler.queue.charge(item.seq.tenant, 1)
    scheduler.steps += 1
    return StepPlan(step_id=scheduler.steps, items=items, release=scheduler.take_releases())


def settle(scheduler: Scheduler, ahead: StepPlan) -> None:
    """After scheduler.complete(previous step): the works of `ahead` whose sequence still runs get the token the
    router fed (the one it sampled in the previous step), and their KV claims are taken again (the router's report
    of the previous step reset the claims, but `ahead` is not in it)."""
    kv = scheduler.kv
    for item in ahead.items:
        if item.follows and item.seq.status is Status.RUNNING:
            item.token_ids = [item.seq.output_ids[-1]]
            kv.claimed += kv.extra(item.position, item.position + 1)


def _ends_after_next(seq: Sequence, max_context: int) -> bool:
    """The token the step in flight samples surely ends the sequence (max_tokens, or the context window is full,
    as Sequence.stop_reason decides): a step after it would be wasted."""
    outputs = len(seq.output_ids) + 1
    return bool(seq.max_tokens and outputs >= seq.max_tokens) or seq.length + 1 >= max_context
