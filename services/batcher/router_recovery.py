"""What the batcher does when a Router.Step fails for a reason other than a full KV cache.

The router holds the KV cache of every running sequence. When a step fails, one Info call (PROBE_TIMEOUT) tells
which case this is:
- the router does not answer, or answers with a new `instance_id`: it died (or stalled) and the KV cache is gone.
  Every running sequence goes back to the queue to recompute prompt + output (as after a preemption; the client's
  stream just pauses), and the loop waits for the router, polling Info. A request whose deadline passes meanwhile
  ends with ERROR (UNAVAILABLE: retry), and so does every re-queued one after `give_up` seconds (nothing waits
  forever, deadline or not). New requests queue meanwhile and run when the router is back.
- the same router answers and the step said INVALID_ARGUMENT: it no longer knows some sequences (its KV lease
  expired while this batcher was stalled, services/router/leases.py): those recompute, at most MAX_RETRIES times
  each (a real bug must not loop).
- anything else (an expert shard lost, the router's own error): the caller fails the step's sequences.

No gRPC here: the router port raises whatever it raises; status codes are read by name.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from services.batcher import metrics
from services.batcher.kv_view import KvView
from services.batcher.step import RouterLimits, StepPlan

if TYPE_CHECKING:
    from services.batcher.engine_loop import EngineLoop

log = logging.getLogger(__name__)


class RouterRecovery:
    PROBE_TIMEOUT = 5.0  # seconds an Info call may take before the router counts as gone
    MAX_RETRIES = 2  # recomputes of one sequence after INVALID_ARGUMENT from a live router
    POLL_MAX = 1.0  # longest pause between Info polls while the router is away

    def __init__(self, give_up: float = 60.0) -> None:
        self.give_up = give_up
        self._retries: dict[str, int] = {}

    async def handle(self, loop: EngineLoop, plan: StepPlan, exc: Exception) -> bool:
        """True when the plan's sequences were re-queued (recompute); False: the caller fails them."""
        limits = await self._probe(loop)
        if limits is None or limits.instance_id != loop.limits.instance_id:
            await self._wait_for_router(loop, limits)
            return True
        if _code(exc) != "INVALID_ARGUMENT":
            return False
        ids = {i.seq.seq_id for i in plan.items if self._retries.get(i.seq.seq_id, 0) < self.MAX_RETRIES}
        if len(ids) < len(plan.items):
            return False
        for seq_id in ids:
            self._retries[seq_id] = self._retries.get(seq_id, 0) + 1
        log.warning("the router no longer knows %d sequences (lease expired?): recomputing them", len(ids))
        loop.scheduler.requeue_running(ids)
        return True

    async def _probe(self, loop: EngineLoop) -> RouterLimits | None:
        try:
            return await asyncio.wait_for(loop.router.info(), self.PROBE_TIMEOUT)
        except Exception:  # unreachable, stalled past the probe, or shutting down: gone for our purposes
            return None

    async def _wait_for_router(self, loop: EngineLoop, limits: RouterLimits | None) -> None:
        scheduler = loop.scheduler
        lost = {s.seq_id for s in scheduler.running}
        scheduler.requeue_running()
        metrics.STEP_FAILURES.labels("router_lost").inc()
        log.warning("router lost (%s): %d running sequences re-queued to recompute", "restarted" if limits else
                    "not answering", len(lost))
        give_up_at, delay = loop.clock() + self.give_up, 0.1
        while limits is None and not loop._stopping:
            scheduler.expire_unavailable("the router is unavailable (restarting) and the request's deadline "
                                         "passed: retry the request")
            if loop.clock() >= give_up_at and lost:
                scheduler.fail_waiting(lost, f"the router has been unavailable for {self.give_up:.0f} s: retry "
                                             "the request later")
                lost = set()
            loop._deliver()
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.POLL_MAX)
            limits = await self._probe(loop)
        if limits is not None:
            self._adopt(loop, limits)

    def _adopt(self, loop: EngineLoop, limits: RouterLimits) -> None:
        """A fresh KV ledger for the router that answered (nothing runs now: every sequence was re-queued)."""
        kv = KvView.for_router(limits.kv_block_size, limits.kv_blocks_total, limits.kv_blocks_free,
                               loop.policy.kv_watermark)
        loop.scheduler.kv, loop.limits = kv, limits
        log.info("router back (instance %s): %d KV blocks free", limits.instance_id[:8], limits.kv_blocks_free)


def _code(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    value = code() if callable(code) else None
    return getattr(value, "name", "")
