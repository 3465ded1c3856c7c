"""The scheduling policy: at every step, which sequences feed which tokens to the router. Pure code on an injected
clock: no sockets, no protobuf, no asyncio. The engine loop drives it:

    plan = scheduler.schedule()           # None: nothing to do (wake at scheduler.wake_at, or on the next add)
    outcome = router.step(plan)           # the router drops plan.release first, then runs the work
    scheduler.complete(plan, outcome)     # or abort(plan, free) when the router refused, fail(plan, why) on errors
    deliver(scheduler.take_events())

A step is built in passes, decodes first so running sequences keep flowing:
0. (joining modes) slot fairness: a full batch gives slots to a waiting tenant below its weighted share (_rebalance);
1. running sequences, decodes before prefill chunks, in rank order (priority, then age); a decode that needs a KV block
   the cache lacks preempts the lowest-ranked running sequence (recompute later), possibly itself;
2. (chunked mode) prefill chunks of running sequences in what is left of the token budget;
3. admissions in weighted-fair order while the batch and the budget have room and the KV cache keeps its watermark.
Requests whose deadline passed are dropped first, queued or running; cancelled ones leave at once. Every sequence
that leaves the router (finished, cancelled, expired, preempted) is listed in the next plan's `release`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from services.batcher.admission import check_room, validate
from services.batcher.fairness import FairQueue
from services.batcher.kv_view import KvView
from services.batcher.meters import WindowSum
from services.batcher.policy import Policy
from services.batcher.sequence import Finish, Sequence, Status
from services.batcher.step import Event, InvalidRequest, StepOutcome, StepPlan, WorkItem


@dataclass
class _Draft:
    budget: float  # tokens left in this step
    # Tokens of chunks expected to come from the prefix cache (their sequence's last chunk did), not charged to the
    # budget: if the cache misses after all, the step computes at most this much more than the budget.
    bonus: float = 0.0
    items: list[WorkItem] = field(default_factory=list)
    planned: set[str] = field(default_factory=set)
    preempted: bool = False


class Scheduler:
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
        self.queue = FairQueue()
        self.running: list[Sequence] = []
        self.steps = 0
        self.preemptions = 0
        self.wake_at: float | None = None  # when schedule() returned None but wants another look
        self._live: dict[str, Sequence] = {}
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._releases: list[str] = []
        self._events: list[Event] = []
        self._admitted = WindowSum(10.0, clock)  # admissions per second, for the retry-after hint

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

    # ---- steps ----------------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        now = self.clock()
        self.wake_at = None
        self._expire(now)
        admit = self._may_admit(now)
        if admit:
            self._rebalance()
        draft = _Draft(budget=self.policy.max_step_tokens if self.policy.chunked else math.inf,
                       bonus=self.policy.max_step_tokens if self.policy.chunked else 0.0)
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

    # ---- passes ---------------------------------------------------------------------------------------------------
    def _plan_running(self, draft: _Draft) -> None:
        order = sorted(self.running, key=lambda s: (s.pending > 1, s.rank))  # decodes first
        for seq in order:
            if seq.status is not Status.RUNNING or seq.seq_id in draft.planned or draft.budget < 1:
                continue
            partial_ok = self.policy.chunked and seq.pending > 1
            budget = draft.budget + (draft.bonus if seq.cache_streak else 0)
            want = int(min(seq.pending, budget)) if partial_ok else seq.pending
            if partial_ok:
                n = self.kv.fit(seq.num_cached, want)
            else:
                n = want if self._make_room(seq, want, draft) else 0
            if n > 0:
                self._take(draft, seq, n)

    def _make_room(self, seq: Sequence, n: int, draft: _Draft) -> bool:
        """Preempts lower-ranked unplanned sequences until `seq` can add n tokens; False if `seq` itself had to go."""
        while not self.kv.can_grow(seq.num_cached, seq.num_cached + n):
            others = [s for s in self.running if s is not seq and s.seq_id not in draft.planned]
            if not others and len(self.running) == 1:
                self._finish(seq, Finish.LENGTH, "the KV cache cannot hold this sequence")
                return False
            victim = max(others + [seq], key=lambda s: s.rank)
            self._preempt(victim)
            draft.preempted = True
            if victim is seq:
                return False
        return True

    def _admit(self, draft: _Draft, now: float) -> None:
        keep = self.kv.watermark
        while len(self.running) < self.policy.batch_limit and draft.budget >= 1:
            seq = self.queue.peek(self.policy.batch_limit)
            if seq is None:
                break
            want = int(min(seq.pending, draft.budget)) if self.policy.chunked else seq.pending
            n = self.kv.fit(0, want, keep_free=keep)
            if n < want and not (self.policy.chunked and n > 0):
                break  # head-of-line: keep fairness order rather than skip to a smaller request
            self.queue.pop(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.first_scheduled is None:
                seq.first_scheduled = now
                self._admitted.add(1)
            self._take(draft, seq, n)

    def _rebalance(self) -> None:
        """Slot fairness: when the batch is full and the next tenant in fair order holds fewer slots than its weighted
        share, preempt (recompute later) the lowest-ranked sequences of tenants above their share, as many as it
        has waiting up to its share. One tenant's burst then cannot hold every slot while another waits."""
        limit = self.policy.batch_limit
        if not self.policy.joins_running_batch or len(self.running) < limit:
            return
        head = self.queue.peek(limit)
        if head is None:
            return
        tenant, q = head.tenant, self.queue
        # whole slots only (floor for the taker, ceil for the giver): shares below one slot never preempt (no ping-pong)
        deficit = min(q.queued(tenant), math.floor(q.share(tenant, limit)) - q.running(tenant))
        for _ in range(deficit):
            over = [s for s in self.running if q.running(s.tenant) > math.ceil(q.share(s.tenant, limit))]
            if not over:
                return
            self._preempt(max(over, key=lambda s: s.rank))

    def _take(self, draft: _Draft, seq: Sequence, n: int) -> None:
        start = seq.num_cached
        bs = self.kv.block_size
        if n < seq.pending and (start + n) // bs * bs > start:  # chunks end on block boundaries: the prefix
            n = (start + n) // bs * bs - start  # cache matches whole blocks from a block-aligned position
        if seq.cache_streak:  # its last chunk was all cached: likely this one too; charge the bonus first
            free = min(n, int(draft.bonus))
            draft.bonus -= free
            draft.budget += free
        self.kv.take(start, start + n)
        sample = start + n == seq.length
        draft.items.append(WorkItem(seq=seq, token_ids=seq.window(start, n), position=start, sample=sample))
        draft.planned.add(seq.seq_id)
        draft.budget -= n
        self.queue.charge(seq.tenant, n)  # now, not after the step: one admission pass then interleaves tenants

    def _may_admit(self, now: float) -> bool:
        """Whether new sequences may join this step; sets wake_at when gathering arrivals for max_wait."""
        if self.running:
            return self.policy.joins_running_batch  # static batches run to completion without joins
        if not len(self.queue) or self.policy.mode == "none":
            return True
        if len(self.queue) >= self.policy.batch_limit:
            return True
        flush_at = min(s.arrival for s in self.queue.waiting()) + self.policy.max_wait
        if now >= flush_at:  # compare against the same sum as wake_at, so waking at wake_at always flushes
            return True
        self.wake_at = flush_at
        return False

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
        )


def _hits(by_id: dict, seq_id: str) -> int:
    out = by_id.get(seq_id)
    return out.cached_tokens if out is not None else 0
