"""The scheduling policy: at every step, which sequences feed which tokens to the router. Pure code on an injected
clock: no sockets, no protobuf, no asyncio. The engine loop drives it:

    plan = scheduler.schedule()           # None: nothing to do (wake at scheduler.wake_at, or on the next add)
    outcome = router.step(plan)           # the router drops plan.release first, then runs the work
    scheduler.complete(plan, outcome)     # or abort(plan, free) when the router refused, fail(plan, why) on errors
    deliver(scheduler.take_events())

A step is built in passes (planning.py), decodes first so running sequences keep flowing:
0. (joining modes) slot fairness: a full batch gives slots to a waiting tenant below its weighted share (_rebalance);
1. running decodes in rank order (priority, then age); a decode that needs a KV block the cache lacks preempts the
   lowest-ranked running sequence (recompute later), possibly itself;
2. (chunked mode) short arrivals: admissions whose whole prompt fits in half the budget left, so a request arriving
   during a long prefill gets its first token within a step or two;
3. (chunked mode) prefill chunks of running sequences in what is left of the token budget;
4. admissions in weighted-fair order while the batch and the budget have room and the KV cache keeps its watermark;
   while several tenants are active, none is admitted past its weighted share of the batch (fairness.FairQueue.cap).
Admissions pass over a request whose prompt prefix a running sequence of its tenant is still prefilling: it waits
(at most policy.prefix_hold seconds) and then hits those blocks in the router's prefix cache (prefix_sharing.py).
Requests whose deadline passed are dropped first, queued or running; cancelled ones leave at once. Every sequence
that leaves the router (finished, cancelled, expired, preempted) is listed in the next plan's `release`.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Iterable

from services.batcher.admission import check_room, validate
from services.batcher.draft import Draft
from services.batcher.fairness import FairQueue
from services.batcher.kv_view import KvView
from services.batcher.meters import WindowSum
from services.batcher.planning import StepPasses
from services.batcher.policy import Policy
from services.batcher.prefix_sharing import PrefixSharing
from services.batcher.sequence import Finish, Sequence, Status
from services.batcher.step import Event, InvalidRequest, StepOutcome, StepPlan


class Scheduler(StepPasses):
    def __init__(
        self,
        policy: Policy,
        kv: KvView,
        max_context: int,
        eos_ids: Iterable[int],
        clock: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.kv = kv
        self.max_context = max_context
        self.eos = frozenset(eos_ids)
        self.clock = clock
        self.queue = FairQueue(clock)  # per-tenant shares of the batch (fairness.py)
        self.running: list[Sequence] = []
        self.steps = 0
        self.preemptions = 0
        self.wake_at: float | None = None  # when schedule() returned None but wants another look
        self._live: dict[str, Sequence] = {}
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._releases: list[str] = []
        self._events: list[Event] = []
        self._admitted = WindowSum(10.0, clock)  # admissions per second, for the retry-after hint
        self.sharing = PrefixSharing(kv.block_size, policy.prefix_hold)  # waits for in-flight prefixes

    # ---- requests -------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queues a request. Raises InvalidRequest (can never run) or QueueFull (try again later)."""
        validate(seq, self.max_context, self.kv)
        if seq.seq_id in self._live:
            raise InvalidRequest(f"request_id {seq.seq_id!r} is already waiting or running")
        check_room(self.queue, self.policy, seq.tenant, self._admitted.rate())
        seq.arrival = self.clock()
        seq.status = Status.WAITING
        self._live[seq.seq_id] = seq
        self.queue.push(seq)
        if seq.deadline is not None:
            heapq.heappush(self._deadlines, (seq.deadline, seq.serial, seq))

    def cancel(self, seq_id: str) -> bool:
        seq = self._live.get(seq_id)
        if seq is None:
            return False
        self._finish(seq, Finish.CANCELLED)
        return True

    def get(self, seq_id: str) -> Sequence | None:
        return self._live.get(seq_id)

    def park(self, seq_id: str) -> bool:
        """Backpressure (backpressure.py): its client does not read. A running sequence leaves the batch (KV
        released, recompute later, as a preemption); it waits outside the fair order until resume(seq_id)."""
        seq = self._live.get(seq_id)
        if seq is None:
            return False
        if seq.status is Status.RUNNING:
            self._preempt(seq)
        self.queue.hold(seq)
        return True

    def resume(self, seq_id: str) -> None:
        """A parked sequence's client reads again: back in the fair order."""
        seq = self._live.get(seq_id)
        if seq is not None:
            self.queue.release(seq)

    # ---- steps ----------------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        now = self.clock()
        self.wake_at = None
        self._expire(now)
        admit = self._may_admit(now)
        if admit:
            self._rebalance()
        draft = Draft(budget=self.policy.max_step_tokens if self.policy.chunked else math.inf,
                      bonus=self.policy.max_step_tokens if self.policy.chunked else 0.0)
        self._plan_running(draft, prefill=False)
        if admit and self.policy.chunked and not draft.preempted:
            self._admit_short(draft, now)  # short arrivals before prefill chunks: a long prompt never stalls them
        self._plan_running(draft)
        while not draft.items and self.running:  # every running sequence waits for blocks: free some
            self._preempt(max(self.running, key=lambda s: s.rank))
            draft.preempted = True
            self._plan_running(draft)
        if admit and not draft.preempted:  # no admissions in a step that had to preempt (it would thrash)
            self._admit(draft, now)
        if not draft.items:
            return None
        self.steps += 1
        return StepPlan(step_id=self.steps, items=draft.items, release=self.take_releases())

    def complete(self, plan: StepPlan, outcome: StepOutcome) -> None:
        """Applies a step's results; sequences cancelled or expired meanwhile are skipped."""
        # First the router's report (leaving sequences credited below are on top of it), then the results.
        self.kv.observe(outcome.kv_blocks_free, outcome.kv_blocks_own, outcome.kv_blocks_cached)
        by_id = {o.seq_id: o for o in outcome.outputs}
        computed = {i.seq.seq_id: len(i.token_ids) - _hits(by_id, i.seq.seq_id) for i in plan.items}
        total = sum(computed.values()) or 1
        for item in plan.items:
            seq = item.seq
            if seq.status is not Status.RUNNING:
                continue
            seq.num_cached = item.position + len(item.token_ids)
            # cost of goods: a share of the step by the tokens computed (cached ones cost nothing)
            seq.engine_seconds += outcome.compute_seconds * computed[seq.seq_id] / total
            if seq.preemptions == 0:  # billing counts the prompt's first computation, not recomputes
                seq.cached_tokens += _hits(by_id, seq.seq_id)
            seq.cache_streak = not item.sample and _hits(by_id, seq.seq_id) == len(item.token_ids)
            if by_id.get(seq.seq_id) is not None:
                seq.add_prompt_scores(item.position, by_id[seq.seq_id].prompt_logprobs)
            if not item.sample:
                continue
            out = by_id.get(seq.seq_id)
            if out is None or out.token_id is None:
                self._finish(seq, Finish.ERROR, f"router returned no token for {seq.seq_id}")
                continue
            seq.output_ids.append(out.token_id)
            event = self._event(seq, [out.token_id])
            if out.logprob is not None:
                event.logprobs, event.top_logprobs = [out.logprob], [list(out.top_logprobs)]
            reason = seq.stop_reason(out.token_id, self.eos, self.max_context)
            if reason is None:
                self._events.append(event)
            else:
                self._finish(seq, reason, event=event)

    def abort(self, plan: StepPlan, kv_blocks_free: int | None = None) -> None:
        """The router refused the step for lack of KV blocks and applied nothing: undo, re-sync, make room."""
        self.kv.drop_plan()
        if kv_blocks_free is not None:
            self.kv.observe(kv_blocks_free)
        if len(self.running) > 1:
            self._preempt(max(self.running, key=lambda s: s.rank))

    def fail(self, plan: StepPlan, detail: str) -> None:
        """The router failed the step: its sequences end with ERROR (their router state is unknown: released)."""
        self.kv.drop_plan()  # the next router report says what it holds
        for item in plan.items:
            if item.seq.status is not Status.FINISHED:
                self._finish(item.seq, Finish.ERROR, detail)

    def requeue_running(self, seq_ids: set[str] | None = None) -> int:
        """The router lost these running sequences' KV cache (it restarted, or swept them): back to the queue to
        recompute prompt + output, as after a preemption. None: every running sequence. Returns how many."""
        lost = [s for s in self.running if seq_ids is None or s.seq_id in seq_ids]
        for seq in lost:
            self._preempt(seq)
        return len(lost)

    def fail_waiting(self, seq_ids: set[str], detail: str) -> int:
        """Ends the given live sequences with ERROR (UNAVAILABLE for the client): the router did not come back for
        them in time. Returns how many were still live."""
        live = [self._live[i] for i in seq_ids if i in self._live]
        for seq in live:
            self._finish(seq, Finish.ERROR, detail)
        return len(live)

    def expire_unavailable(self, detail: str) -> int:
        """Ends the sequences whose deadline passed with ERROR (not DEADLINE): while the router is away, a request
        that runs out of time did so because of it, and the client should retry (UNAVAILABLE)."""
        return self._expire(self.clock(), Finish.ERROR, detail)

    def take_releases(self) -> list[str]:
        """Sequences the router must drop (finished, cancelled, preempted); their blocks return to the ledger."""
        out, self._releases = self._releases, []
        self.kv.sent(out)
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    # ---- state changes --------------------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.queue.left_batch(seq)
        self.kv.release(seq.seq_id)
        self._releases.append(seq.seq_id)
        seq.num_cached = 0
        seq.cache_streak = False
        seq.preemptions += 1
        self.preemptions += 1
        seq.status = Status.WAITING
        self.queue.push(seq)

    def _finish(self, seq: Sequence, reason: Finish, detail: str = "", event: Event | None = None) -> None:
        if seq.status is Status.WAITING:
            self.queue.discard(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.queue.left_batch(seq)
            self.kv.release(seq.seq_id)
            self._releases.append(seq.seq_id)
        seq.status, seq.finish = Status.FINISHED, reason
        self._live.pop(seq.seq_id, None)
        self.sharing.forget(seq.seq_id)
        event = event or self._event(seq, [])
        event.finish, event.detail = reason, detail
        event.engine_seconds = seq.engine_seconds
        event.preemptions = seq.preemptions
        self._events.append(event)

    def _expire(self, now: float, reason: Finish = Finish.DEADLINE, detail: str = "the deadline passed") -> int:
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            seq = heapq.heappop(self._deadlines)[2]
            if seq.status is not Status.FINISHED:
                self._finish(seq, reason, detail)
                expired += 1
        return expired

    def _event(self, seq: Sequence, token_ids: list[int]) -> Event:
        return Event(
            seq_id=seq.seq_id,
            token_ids=token_ids,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            queue_seconds=seq.queue_seconds(self.clock()),
            preemptions=seq.preemptions,
            cached_tokens=seq.cached_tokens,
            prompt_logprobs=seq.take_prompt_scores() if token_ids else [],
        )


def _hits(by_id: dict, seq_id: str) -> int:
    out = by_id.get(seq_id)
    return out.cached_tokens if out is not None else 0
