"""The batcher's view of the router's KV cache: what the router last reported, minus what the step being planned
takes, plus what the sequences leaving it give back. The router owns allocation (its prefix cache shares blocks
between sequences, which no mirror could follow); it reports with every step result its free blocks (cached idle
blocks included: they are evicted on demand) and, per sequence, the blocks only that sequence holds.

Planning is conservative, so a planned step always fits: a new sequence is assumed to need every block of its
tokens (a prefix-cache hit only needs fewer), a running sequence the blocks past the ones it has, and a leaving
sequence gives back only the blocks it holds alone (shared ones stay with the others).
"""

from __future__ import annotations

from collections.abc import Iterable


class KvView:
    def __init__(self, block_size: int, total_blocks: int, watermark_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, got {block_size}")
        if total_blocks < 1:
            raise ValueError(f"kv_blocks_total must be >= 1, got {total_blocks}")
        self.block_size = block_size
        self.total = total_blocks
        self.watermark = max(0, min(watermark_blocks, total_blocks - 1))  # kept free when admitting new sequences
        self.reported = total_blocks  # free blocks in the router's last report
        self.cached = 0  # of those, idle blocks kept for a cached prefix
        self.own: dict[str, int] = {}  # blocks only this sequence holds, as last reported
        self.claimed = 0  # blocks the plan being built takes
        self._leaving: set[str] = set()  # released here, not yet sent to the router
        self._sent: set[str] = set()  # sent to the router, not yet in one of its reports

    @classmethod
    def for_router(cls, block_size: int, total: int, free: int, watermark_fraction: float) -> KvView:
        view = cls(block_size, total, watermark_blocks=int(watermark_fraction * total))
        view.observe(free)  # blocks held by someone else (a previous batcher) stay out of reach
        return view

    @property
    def free(self) -> int:
        back = sum(self.own.get(s, 0) for s in self._leaving | self._sent)
        return max(0, self.reported - self.claimed + back)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def extra(self, cached: int, tokens_after: int) -> int:
        """Blocks a sequence holding `cached` tokens adds to hold `tokens_after`."""
        return max(0, self.blocks_for(tokens_after) - self.blocks_for(cached))

    def can_grow(self, cached: int, tokens_after: int, keep_free: int = 0) -> bool:
        return self.extra(cached, tokens_after) <= self.free - keep_free

    def fit(self, cached: int, want: int, keep_free: int = 0) -> int:
        """The most tokens (<= want) a sequence holding `cached` tokens can add within the free blocks."""
        room = (self.blocks_for(cached) + max(0, self.free - keep_free)) * self.block_size - cached
        return max(0, min(want, room))

    def take(self, cached: int, tokens_after: int) -> None:
        add = self.extra(cached, tokens_after)
        if add > self.free:
            raise RuntimeError(f"KV plan overdraft: {add} blocks wanted, {self.free} free")
        self.claimed += add

    def release(self, seq_id: str) -> None:
        """The sequence leaves the router (finished, cancelled, preempted): its own blocks come back."""
        self._leaving.add(seq_id)

    def sent(self, seq_ids: Iterable[str]) -> None:
        """These releases are on their way to the router (in a step request or a Release call)."""
        ids = set(seq_ids)
        self._leaving -= ids
        self._sent |= ids

    def drop_plan(self) -> None:
        """The router applied none of the planned step's work."""
        self.claimed = 0

    def observe(self, router_free: int, own: dict[str, int] | None = None, cached: int | None = None) -> None:
        """A router report taken after the releases sent so far: they are in router_free now."""
        self.reported, self.claimed = router_free, 0
        if cached is not None:
            self.cached = cached
        for seq_id in self._sent:
            self.own.pop(seq_id, None)
        self._sent.clear()
        if own:
            self.own.update(own)
