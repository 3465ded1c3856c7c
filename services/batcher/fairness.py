"""Weighted fair queuing across tenants by tokens served (the Virtual Token Counter of Sheng et al., OSDI'24).

Each tenant has a counter: tokens computed for it divided by its weight. The next request admitted comes from the
backlogged tenant with the smallest counter; within a tenant, higher priority first, then the oldest. A tenant that
becomes active (its first waiting or running request after being idle) has its counter lifted to the smallest counter
of the other active tenants (or, when none is active, to the counter of the tenant that went idle last), so idleness
banks no credit: a flood from A cannot starve B, and B returning after a
quiet hour cannot starve A.

Batch slots are shared the same way: tenants below their weighted share of the slots are admitted first, and when the
batch is full the scheduler may preempt a sequence of a tenant above its share to make room (scheduler._rebalance).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from services.batcher.sequence import Sequence, Status


@dataclass
class _Tenant:
    weight: float = 1.0
    counter: float = 0.0  # tokens served / weight
    heap: list[tuple[tuple[int, float, int], Sequence]] = field(default_factory=list)  # (rank, seq); lazy deletes
    queued: int = 0  # live WAITING entries in heap
    running: int = 0  # sequences of this tenant in the batch


class FairQueue:
    """The waiting requests of all tenants, served in weighted-fair order."""

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}
        self._size = 0
        self._last_idle = 0.0  # counter of the tenant that last went idle: the floor when nobody is active

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

    def peek(self, slots: int = 0) -> Sequence | None:
        """The next sequence to admit, or None when nothing waits. With `slots` (the batch size), tenants holding
        fewer running sequences than their weighted share of the slots go first; then the smallest counter."""
        best: _Tenant | None = None
        best_key: tuple = ()
        for name, t in self._tenants.items():
            if not t.queued:
                continue
            key = (slots > 0 and t.running >= self.share(name, slots), t.counter, t.running)
            if best is None or key < best_key:
                best, best_key = t, key
        if best is None:
            return None
        self._drop_stale(best)
        return best.heap[0][1]

    def share(self, tenant: str, slots: int) -> float:
        """The tenant's weighted share of `slots` among the active tenants (those waiting or running)."""
        t = self._tenants.get(tenant)
        if t is None or not (t.queued or t.running):
            return 0.0
        total = sum(x.weight for x in self._tenants.values() if x.queued or x.running)
        return slots * t.weight / total

    def running(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.running if t else 0

    def pop(self, seq: Sequence) -> None:
        """Removes `seq` (the one peek returned) as it joins the batch."""
        t = self._tenants[seq.tenant]
        self._drop_stale(t)
        assert t.heap and t.heap[0][1] is seq, "pop() must follow peek()"
        heapq.heappop(t.heap)
        t.queued -= 1
        t.running += 1
        self._size -= 1

    def discard(self, seq: Sequence) -> None:
        """Forgets a waiting sequence that was cancelled or expired (call before changing its status)."""
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
        return [s for t in self._tenants.values() for _, s in t.heap if s.status is Status.WAITING]

    def _lift(self, name: str, tenant: _Tenant) -> None:
        active = [t.counter for n, t in self._tenants.items() if n != name and (t.queued or t.running)]
        tenant.counter = max(tenant.counter, min(active) if active else self._last_idle)

    def _note_idle(self, t: _Tenant) -> None:
        if t.queued == 0 and t.running == 0:
            self._last_idle = t.counter

    @staticmethod
    def _drop_stale(t: _Tenant) -> None:
        while t.heap and t.heap[0][1].status is not Status.WAITING:
            heapq.heappop(t.heap)
