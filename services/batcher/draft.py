"""A step being planned (scheduler.py): the token budget left, the SequenceWorks so far, and how one sequence's chunk is
cut and charged against the budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.batcher.kv_view import KvView
from services.batcher.sequence import Sequence
from services.batcher.step import SequenceWork


@dataclass
class Draft:
    budget: float  # tokens left in this step (computed tokens: prefix-cache hits are not charged)
    # Tokens of chunks expected to come from the prefix cache (their sequence's last chunk did), not charged to the
    # budget: if the cache misses after all, the step computes at most this much more than the budget.
    bonus: float = 0.0
    items: list[SequenceWork] = field(default_factory=list)
    planned: set[str] = field(default_factory=set)
    preempted: bool = False

    def take(self, seq: Sequence, n: int, kv: KvView, free: int = 0) -> int:
        """Plans seq's next n tokens; `free` of them (its leading ones) are known to be written by a running sequence
        of the same salt (prefix_sharing.py) and are not charged. Returns the tokens charged (to be computed)."""
        start = seq.num_cached
        bs = kv.block_size
        if n < seq.pending and (start + n) // bs * bs > start:  # chunks end on block boundaries: the prefix
            n = (start + n) // bs * bs - start  # cache matches whole blocks from a block-aligned position
        free = min(free, n)
        if seq.cache_streak:  # its last chunk was all cached: likely this one too; charge the bonus first
            extra = min(n - free, int(self.bonus))
            self.bonus -= extra
            self.budget += extra
        kv.take(start, start + n)
        sample = start + n == seq.length
        self.items.append(SequenceWork(seq=seq, token_ids=seq.window(start, n), position=start, sample=sample))
        self.planned.add(seq.seq_id)
        self.budget -= n - free
        return n - free
