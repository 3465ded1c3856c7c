"""The batcher's one asyncio loop: ask the scheduler for a step, run it on the router, feed the results back, and
push each request's events into its own asyncio queue. Everything that changes scheduler state runs on the event
loop's thread, so the scheduler needs no locks.

    turn:  schedule -> send Step(plan, with plan.release) -> deliver events -> complete
           (pipelined, lookahead.py: send the next decode step before completing this one, while it can)
    idle:  deliver events -> Release(pending) -> sleep until scheduler.wake_at, a new request, or a cancel

The previous step's tokens are delivered once the next Step is on its way (not before): their streams' writes to the
gateway then run while the router computes, instead of delaying the router's next step (on 2 cores they also compete
with it for the CPU).

A cancel arriving during a step ends the request's stream at once; its sequence is released before the next step
(within one step). The router's busy fraction is its reported compute time over wall time, on a sliding window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol, Sequence as Seq

from moemesh.errors import ErrorStatus
from services.batcher import metrics
from services.batcher.backpressure import Backpressure, Limits
from services.batcher.client_stream import ClientStream
from services.batcher.kv_view import KvView
from services.batcher.lookahead import drive
from services.batcher.meters import BusyMeter
from services.batcher.policy import Policy
from services.batcher.router_recovery import RouterRecovery
from services.batcher.scheduler import Scheduler
from services.batcher.sequence import Sequence
from services.batcher.step import Event, RouterFull, RouterLimits, StepOutcome, StepPlan

log = logging.getLogger(__name__)


class RouterPort(Protocol):
    async def info(self) -> RouterLimits: ...
    async def step(self, plan: StepPlan) -> StepOutcome: ...
    async def release(self, seq_ids: Seq[str]) -> int: ...


class RouterNotReady(Exception):
    """The router did not answer Info in time (UNAVAILABLE for the caller)."""

    status = ErrorStatus.UNAVAILABLE


class EngineLoop:
    MAX_REFUSALS = 3  # consecutive RESOURCE_EXHAUSTED answers before the step's sequences fail
    ERROR_BACKOFF = 0.2  # seconds after a failed step
    KV_POLL = 0.1  # seconds between Info polls when foreign sequences block every admission
    # Event-loop iterations a Step call needs to send its request (client interceptor task, then the call's own
    # task) before the previous step's events are delivered.
    SEND_HOPS = 3

    def __init__(self, router: RouterPort, policy: Policy, *, clock: Callable[[], float] = time.monotonic,
                 busy_window: float = 10.0, router_wait: float = 60.0, pipeline: bool = True,
                 stream_limits: Limits | None = None) -> None:
        self.router, self.policy, self.clock = router, policy, clock
        self.pipeline = pipeline  # send step N+1 before step N's result is back (lookahead.py)
        self.router_wait = router_wait
        self.busy = BusyMeter(busy_window, clock)
        self.scheduler: Scheduler | None = None
        self.limits: RouterLimits | None = None
        self._streams: dict[str, ClientStream] = {}
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stalls: asyncio.Task | None = None  # ends streams parked past the stall limit
        self._preemptions_counted = 0  # scheduler.preemptions already added to the Prometheus counter
        self._refusals = 0
        self._stopping = False
        self.recovery = RouterRecovery(give_up=router_wait)  # a router that dies or restarts: recompute
        self.backpressure = Backpressure(stream_limits or Limits(), clock)  # slow readers are parked

    # ---- life cycle -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher-engine-loop")
        self._stalls = asyncio.get_running_loop().create_task(
            self.backpressure.end_stalled(lambda: {k: s.queue for k, s in self._streams.items()}, self.cancel))

    async def stop(self, wait: float = 5.0) -> None:
        """Stops stepping after the step in flight (waiting up to `wait` seconds); ends every open stream as
        cancelled and releases its sequence in the router."""
        self._stopping = True
        self._wake.set()
        if self._stalls is not None:
            self._stalls.cancel()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), wait)
            except (TimeoutError, asyncio.CancelledError):
                pass
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.scheduler is not None:
            for seq_id in list(self._streams):
                self.scheduler.cancel(seq_id)
            self._deliver()
            await self._release(self.scheduler.take_releases())

    async def wait_ready(self, timeout: float | None = None) -> Scheduler:
        try:
            await asyncio.wait_for(self._ready.wait(), self.router_wait if timeout is None else timeout)
        except TimeoutError:
            raise RouterNotReady("the router has not answered Info yet; retry later") from None
        assert self.scheduler is not None
        return self.scheduler

    # ---- requests -------------------------------------------------------------------------------------------------
    async def submit(self, seq: Sequence) -> asyncio.Queue[Event]:
        """Queues a sequence; its events arrive on the returned queue, the last one with `finish` set.
        Raises InvalidRequest or QueueFull (from the scheduler), RouterNotReady."""
        scheduler = await self.wait_ready()
        scheduler.add(seq)
        buffer = self.backpressure.buffer(lambda: self._resume(seq.seq_id))
        stream = self._streams[seq.seq_id] = ClientStream(arrival=seq.arrival, queue=buffer)
        metrics.PROMPT_TOKENS.inc(len(seq.prompt_ids))
        self._wake.set()
        return stream.queue

    def cancel(self, seq_id: str) -> bool:
        found = self.scheduler is not None and self.scheduler.cancel(seq_id)
        if found:
            self._deliver()
            self._wake.set()  # an idle loop releases the sequence now
        return found

    # ---- the loop -------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        await self._connect()
        while not self._stopping:
            try:
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the engine: log it and go on
                log.exception("engine loop turn failed")
                await asyncio.sleep(self.ERROR_BACKOFF)

    async def _connect(self) -> None:
        delay = 0.1
        while True:
            try:
                limits = await self.router.info()
                break
            except Exception as exc:  # the router may start after us
                log.info("waiting for the router: %s", _describe(exc))
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
        kv = KvView.for_router(limits.kv_block_size, limits.kv_blocks_total, limits.kv_blocks_free,
                               self.policy.kv_watermark)
        self.limits = limits
        self.scheduler = Scheduler(self.policy, kv, limits.max_context, limits.eos_token_ids, self.clock)
        log.info("router %s: model %s, context %d, %d KV blocks of %d tokens, eos %s",
                 getattr(self.router, "address", ""), limits.model, limits.max_context, limits.kv_blocks_total,
                 limits.kv_block_size, limits.eos_token_ids)
        self._ready.set()

    async def _turn(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        self._wake.clear()
        plan = scheduler.schedule()
        if plan is None:
            self._deliver()
            # nothing fits although nothing runs: blocks held by someone else; watch them go
            blocked = len(scheduler.queue) > 0 and not scheduler.running and scheduler.wake_at is None
            wake_at = scheduler.wake_at
            await self._release(scheduler.take_releases())
            self._update_gauges()
            if blocked:
                await self._poll_kv()
            await self._sleep(wake_at)
            return
        call = await self._send(plan)
        self._deliver()
        await drive(self, plan, call)  # complete it, and the steps pipelined behind it (lookahead.py)
        self._update_gauges()

    async def _send(self, plan: StepPlan) -> asyncio.Future[StepOutcome]:
        call = asyncio.ensure_future(self.router.step(plan))  # carries plan.release
        try:
            for _ in range(self.SEND_HOPS):  # let the call reach the wire before the streams take the loop
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            call.cancel()
            raise
        return call

    async def _step(self, plan: StepPlan, call: asyncio.Future[StepOutcome]) -> bool:
        """Awaits the step's result and applies it; False when the step failed (handled here)."""
        scheduler = self.scheduler
        assert scheduler is not None
        try:
            outcome = await call
        except RouterFull as exc:
            metrics.STEP_FAILURES.labels("capacity").inc()
            self._refusals += 1
            if self._refusals > self.MAX_REFUSALS:
                scheduler.fail(plan, f"router KV cache full: {exc}")
            else:
                scheduler.abort(plan, exc.kv_blocks_free)
            return False
        except Exception as exc:  # router down, timeout, bad state: these sequences cannot go on
            metrics.STEP_FAILURES.labels("error").inc()
            log.warning("step %d failed: %s", plan.step_id, _describe(exc))
            if not await self.recovery.handle(self, plan, exc):
                scheduler.fail(plan, f"router step failed: {_describe(exc)}")
                self._deliver()  # the clients hear of it now, not after the backoff (a shard fault's 1 s budget)
                await asyncio.sleep(self.ERROR_BACKOFF)
            return False
        self._refusals = 0
        scheduler.complete(plan, outcome)
        self.busy.add(outcome.compute_seconds)
        metrics.ROUTER_BUSY_SECONDS.inc(outcome.compute_seconds)
        metrics.BATCH_SIZE.observe(len(plan.items))
        metrics.ITERATION_TOKENS.observe(plan.tokens)
        return True

    async def _release(self, seq_ids: list[str]) -> None:
        if not seq_ids:
            return
        try:
            free = await self.router.release(seq_ids)
        except Exception as exc:
            log.warning("release of %d sequences failed: %s", len(seq_ids), _describe(exc))
            return
        if self.scheduler is not None:
            self.scheduler.kv.observe(free)

    async def _sleep(self, wake_at: float | None) -> None:
        timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _poll_kv(self) -> None:
        try:
            self.scheduler.kv.observe((await self.router.info()).kv_blocks_free)
        except Exception as exc:
            log.warning("router Info failed: %s", _describe(exc))
        await asyncio.sleep(self.KV_POLL)
        self._wake.set()

    # ---- events ---------------------------------------------------------------------------------------------------
    def _deliver(self) -> None:
        now = self.clock()
        for event in self.scheduler.take_events():
            stream = self._streams.get(event.seq_id)
            if stream is None:
                continue
            stream.observe(event, now)
            stream.queue.put_nowait(event)
            if event.finish is not None:
                del self._streams[event.seq_id]
            elif self.backpressure.should_park(stream.queue):  # its client stopped reading
                self.scheduler.park(event.seq_id)
                metrics.STREAM_PARKS.inc()

    def _resume(self, seq_id: str) -> None:
        """A parked stream's buffer is down to the low mark: schedule it again."""
        if self.scheduler is not None and seq_id in self._streams:
            self.scheduler.resume(seq_id)
            self._wake.set()

    def _update_gauges(self) -> None:
        s = self.scheduler
        # preemptions happen while planning (slot fairness, KV room) and when parking, not in complete(): count all
        metrics.PREEMPTIONS.inc(max(0, s.preemptions - self._preemptions_counted))
        self._preemptions_counted = s.preemptions
        metrics.RUNNING.set(len(s.running))
        metrics.WAITING.set(len(s.queue))
        metrics.KV_USAGE.set(1 - s.kv.free / s.kv.total)
        metrics.ROUTER_BUSY.set(self.busy.fraction())


def _describe(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    code = getattr(exc, "code", None)
    return f"{code().name}: {text}" if callable(code) and hasattr(code(), "name") else (text or type(exc).__name__)
