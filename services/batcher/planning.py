"""The passes that build one step, the planning half of the Scheduler (scheduler.py, which says in what order they
run): running sequences' decodes and prefill chunks, admissions in weighted-fair order (short arrivals before
prefill chunks; requests waiting for an in-flight prefix passed over, prefix_sharing.py), slot rebalancing.

A mixin: it works on the Scheduler's state (policy, kv, queue, running, sharing, wake_at, _admitted) and calls its
state changes (_preempt, _finish). No sockets, no protobuf, no asyncio.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from services.batcher.draft import Draft
from services.batcher.sequence import Finish, Sequence, Status

if TYPE_CHECKING:
    from services.batcher.fairness import FairQueue
    from services.batcher.kv_view import KvView
    from services.batcher.meters import WindowSum
    from services.batcher.policy import Policy
    from services.batcher.prefix_sharing import PrefixSharing


# A step in which a short request joins a long prefill keeps this share of the token budget for prefill chunks
# (at 512: 32 tokens). On 2 CPU cores a quarter (128 tokens at 7.8k of context) still took about a second, which
# the newcomer waited on top of the step already running (benchmarks/long_prompt_interleave.py).
JOIN_STEP_SHARE = 1 / 16


class StepPasses:
    policy: Policy
    kv: KvView
    queue: FairQueue
    running: list[Sequence]
    sharing: PrefixSharing
    wake_at: float | None
    _admitted: WindowSum

    def _plan_running(self, draft: Draft, prefill: bool = True) -> None:
        """Plans running sequences' decodes, then (prefill=True) their prefill chunks."""
        order = sorted(self.running, key=lambda s: (s.pending > 1, s.rank))  # decodes first
        for seq in order:
            if seq.status is not Status.RUNNING or seq.seq_id in draft.planned or draft.budget < 1:
                continue
            if seq.pending > 1 and not prefill:
                break
            partial_ok = self.policy.chunked and seq.pending > 1
            budget = draft.budget + (draft.bonus if seq.cache_streak else 0)
            want = int(min(seq.pending, budget)) if partial_ok else seq.pending
            if partial_ok:
                n = self.kv.fit(seq.num_cached, want)
            else:
                n = want if self._make_room(seq, want, draft) else 0
            if n > 0:
                self._take(draft, seq, n)

    def _make_room(self, seq: Sequence, n: int, draft: Draft) -> bool:
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

    def _admit_short(self, draft: Draft, now: float) -> None:
        """Admits requests whose whole prompt fits in half the budget left, before running prefill chunks. When one
        joins while a long prefill would fill the step, the step's prefill is cut to JOIN_STEP_SHARE of
        max_step_tokens: the newcomer's first token comes with this step, and a chunk's time grows with its context
        (attention), not only with its tokens, so a full chunk deep into a long prompt is the slowest step there is.
        The long prompt still advances (a few tokens) and loses at most one short step per joining request; a flood
        of short ones is bounded by the batch size."""
        if self._admit(draft, now, whole=True) and any(
                s.pending > draft.budget for s in self.running if s.seq_id not in draft.planned):
            draft.budget = min(draft.budget, self.policy.max_step_tokens * JOIN_STEP_SHARE)

    def _admit(self, draft: Draft, now: float, whole: bool = False) -> int:
        """Admits waiting sequences in fair order; returns how many. Those waiting for a running sequence to write their prefix are
        passed over (prefix_sharing.py). whole=True (before prefill chunks): only ones whose whole prompt fits in
        half the budget left, so short arrivals join at once and the running prefill chunks keep the rest."""
        keep, held, floor = self.kv.watermark, set(), draft.budget / 2 if whole else 0.0
        admitted = 0
        while len(self.running) < self.policy.batch_limit and draft.budget >= 1:
            seq = self.queue.peek(self.policy.batch_limit, skip=held)
            if seq is None:
                break
            share = self.sharing.look(seq, self.running, now)
            if share.hold:
                held.add(seq.seq_id)
                ends = self.sharing.hold_ends(now)  # the hold's bound, should nothing else wake the loop
                self.wake_at = ends if self.wake_at is None or ends is None else min(self.wake_at, ends)
                continue
            if whole and seq.pending - share.hits > draft.budget - floor:
                break
            want = int(min(seq.pending, draft.budget + share.hits)) if self.policy.chunked else seq.pending
            n = self.kv.fit(0, want, keep_free=keep)
            if n < want and not (self.policy.chunked and n > 0):
                break  # head-of-line: keep fairness order rather than skip to a smaller request
            self.queue.pop(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.sharing.joined(seq.seq_id)
            if seq.first_scheduled is None:
                seq.first_scheduled = now
                self._admitted.add(1)
            self._take(draft, seq, n, share.hits)
            admitted += 1
        return admitted

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

    def _take(self, draft: Draft, seq: Sequence, n: int, free: int = 0) -> None:
        computed = draft.take(seq, n, self.kv, free)
        self.queue.charge(seq.tenant, computed)  # now, not after the step: one admission pass then interleaves tenants

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
