"""Weighted fair queuing across tenants by tokens served (the Virtual Token Counter of Sheng et al., OSDI'24).

Each tenant has a counter: tokens computed for it divided by its weight. The next request admitted comes from the
backlogged tenant with the smallest counter; within a tenant, higher priority first, then the oldest. A tenant that
becomes active (its first waiting or running request after being idle) has its counter lifted to the smallest counter
of the other active tenants (or, when none is active, to the counter of the tenant that went idle last), so idleness
banks no credit: a flood from A cannot starve B, and B returning after a
quiet hour cannot starve A.

Parked sequences (backpressure.py: their client does not read) are held out of the order: they count neither as
queued nor as active until released.

Batch slots are shared the same way: tenants below their weighted share of the slots are admitted first, and when the
batch is full the scheduler may preempt a sequence of a tenant above its share to make room (scheduler._rebalance).
While more than one tenant is active, a tenant is not admitted past its share rounded up (`cap`): one tenant's
backlog (a thousand streams, say) then cannot fill the spare slots, since on a CPU every sequence in the batch makes
each step slower for all of them (measured: 15 ms per step at 2-3 sequences, 45-60 ms at 31), and its tokens load the
front end that must deliver the others' too. A tenant stays active for IDLE_GRACE_S after its last request left: one
with requests every fraction of a second is not counted out between two of them (the other would fill the batch in
that gap). Parked sequences count neither as running nor as waiting.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from services.batcher.sequence import Sequence, Status

IDLE_GRACE_S = 1.0  # seconds a tenant counts as active after its last request left (for shares and caps)


@dataclass
class _Tenant:
    weight: float = 1.0
    counter: float = 0.0  # tokens served / weight
    heap: list[tuple[tuple[int, float, int], Sequence]] = field(default_factory=list)  # (rank, seq); lazy deletes
    queued: int = 0  # live WAITING entries in heap
    running: int = 0  # sequences of this tenant in the batch
    idle_at: float | None = None  # clock time it last went idle (nothing waiting or running)


class FairQueue:
    """The waiting requests of all tenants, served in weighted-fair order."""

    def __init__(self, clock: Callable[[], float] | None = None, idle_grace: float = IDLE_GRACE_S) -> None:
        self._clock = clock
        self._grace = idle_grace if clock is not None else 0.0  # no clock: active means waiting or running
        self._tenants: dict[str, _Tenant] = {}
        self._size = 0
        self._last_idle = 0.0  # counter of the tenant that last went idle: the floor when nobody is active
        self._held: set[str] = set()  # seq_ids of parked WAITING sequences (their heap entries are skipped)

    def __len__(self) -> int:
        return self._size

    def queued(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.queued if t else 0

    def counter(self, tenant: str) -> float:
        t = self._tenants.get(tenant)
        return t.counter if t else 0.0

    def push(self, seq: Sequence) -> None:
        """Queues a WAITING sequence (fresh, or preempted: its old arrival puts it ahead of later ones)."""
        t = self._tenants.setdefault(seq.tenant, _Tenant())
        t.weight = seq.weight
        if t.queued == 0 and t.running == 0:
            self._lift(seq.tenant, t)
        heapq.heappush(t.heap, (seq.rank, seq))
        t.queued += 1
        self._size += 1

    def peek(self, slots: int = 0, skip: Collection[str] = ()) -> Sequence | None:
        """The next sequence to admit, or None when nothing waits. With `slots` (the batch size), tenants holding
        fewer running sequences than their weighted share of the slots go first; then the smallest counter; tenants
        at their cap (see `cap`) are passed over. Sequences whose seq_id is in `skip` (held back for this step) are
        passed over: their tenant's next counts."""
        best: Sequence | None = None
        best_key: tuple = ()
        active = self._active_weights() if slots > 0 else {}  # once per call: shares and caps of every tenant
        total = sum(active.values())
        for name, t in self._tenants.items():
            head = self._head(t, skip) if t.queued else None
            if head is None:
                continue
            share = slots * t.weight / total if slots > 0 else 0.0  # t waits, so it is active: total > 0
            if slots > 0 and t.running >= (max(1, math.ceil(share)) if len(active) > 1 else slots):
                continue  # at its cap (see `cap`)
            key = (slots > 0 and t.running >= share, t.counter, t.running)
            if best is None or key < best_key:
                best, best_key = head, key
        return best

    def share(self, tenant: str, slots: int) -> float:
        """The tenant's weighted share of `slots` among the active tenants (those waiting or running)."""
        active = self._active_weights()
        return slots * active[tenant] / sum(active.values()) if tenant in active else 0.0

    def cap(self, tenant: str, slots: int) -> int:
        """The most sequences `tenant` may have in a batch of `slots`: all of them while no other tenant is active,
        else its weighted share rounded up (at least 1). peek() applies the same rule."""
        if not set(self._active_weights()) - {tenant}:
            return slots
        return max(1, math.ceil(self.share(tenant, slots)))

    def running(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.running if t else 0

    def pop(self, seq: Sequence) -> None:
        """Removes `seq` (the one peek returned) as it joins the batch."""
        t = self._tenants[seq.tenant]
        self._drop_stale(t)
        if t.heap and t.heap[0][1] is seq:
            heapq.heappop(t.heap)
        else:  # peek(skip=...) passed over the ones ahead of it
            t.heap.remove((seq.rank, seq))  # ValueError: pop() must follow peek()
            heapq.heapify(t.heap)
        t.queued -= 1
        t.running += 1
        self._size -= 1

    def hold(self, seq: Sequence) -> None:
        """Takes a WAITING sequence out of the order (parked) until release(seq); its heap entry goes stale."""
        if seq.seq_id in self._held or seq.status is not Status.WAITING:
            return
        t = self._tenants[seq.tenant]
        self._held.add(seq.seq_id)
        t.queued -= 1
        self._size -= 1
        self._drop_stale(t)
        self._note_idle(t)

    def release(self, seq: Sequence) -> None:
        """Puts a held sequence back in the order (its old arrival keeps its place among the tenant's requests)."""
        if seq.seq_id not in self._held:
            return
        self._held.discard(seq.seq_id)
        t = self._tenants[seq.tenant]
        if t.queued == 0 and t.running == 0:
            self._lift(seq.tenant, t)
        heapq.heappush(t.heap, (seq.rank, seq))
        t.queued += 1
        self._size += 1

    def held(self) -> int:
        return len(self._held)

    def discard(self, seq: Sequence) -> None:
        """Forgets a waiting sequence that was cancelled or expired (call before changing its status)."""
        if seq.seq_id in self._held:  # parked: already out of the counts
            self._held.discard(seq.seq_id)
            seq.status = Status.FINISHED
            return
        t = self._tenants[seq.tenant]
        t.queued -= 1
        self._size -= 1
        seq.status = Status.FINISHED  # its heap entry is now stale and skipped lazily
        self._drop_stale(t)
        self._note_idle(t)

    def left_batch(self, seq: Sequence) -> None:
        """A running sequence finished or was preempted."""
        t = self._tenants[seq.tenant]
        t.running -= 1
        self._note_idle(t)

    def charge(self, tenant: str, tokens: int) -> None:
        """Counts tokens computed for the tenant (at planning time, so one admission pass interleaves tenants)."""
        t = self._tenants.setdefault(tenant, _Tenant())
        t.counter += tokens / t.weight

    def waiting(self) -> list[Sequence]:
        return [s for t in self._tenants.values() for _, s in t.heap
                if s.status is Status.WAITING and s.seq_id not in self._held]

    def _lift(self, name: str, tenant: _Tenant) -> None:
        active = [t.counter for n, t in self._tenants.items() if n != name and (t.queued or t.running)]
        tenant.counter = max(tenant.counter, min(active) if active else self._last_idle)

    def _note_idle(self, t: _Tenant) -> None:
        if t.queued == 0 and t.running == 0:
            self._last_idle = t.counter
            t.idle_at = self._clock() if self._clock is not None else None

    def _active_weights(self) -> dict[str, float]:
        """Weight of each active tenant: waiting or running (parked sequences are neither), or idle for less than
        the grace."""
        since = self._clock() - self._grace if self._grace > 0 else None
        return {name: t.weight for name, t in self._tenants.items() if t.queued or t.running or (
            since is not None and t.idle_at is not None and t.idle_at > since)}

    def _head(self, t: _Tenant, skip: Collection[str]) -> Sequence | None:
        """The tenant's first waiting sequence not in `skip` (rank order; scans only when its head is skipped)."""
        self._drop_stale(t)
        if t.heap and t.heap[0][1].seq_id not in skip:
            return t.heap[0][1]
        rest = [e for e in t.heap if e[1].status is Status.WAITING and e[1].seq_id not in skip
                and e[1].seq_id not in self._held]
        return min(rest, key=lambda e: e[0])[1] if rest else None

    def _drop_stale(self, t: _Tenant) -> None:
        # stale: no longer waiting, or parked (release() pushes a fresh entry; a duplicate left deeper in the heap
        # is harmless: it is skipped here whenever its sequence is not waiting, and pop() takes one entry)
        while t.heap and (t.heap[0][1].status is not Status.WAITING or t.heap[0][1].seq_id in self._held):
            heapq.heappop(t.heap)
