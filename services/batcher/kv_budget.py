"""The batcher's ledger of the router's paged KV cache: which sequence holds how many blocks.

The router allocates ceil(cached_tokens / block_size) blocks per sequence; the batcher mirrors that so it can plan a
step that fits (the router answers RESOURCE_EXHAUSTED and applies nothing otherwise). Blocks the router reports as
used that the ledger does not know of (another client, rounding) are tracked as `external` and kept out of reach.
"""

from __future__ import annotations


class KvBudget:
    def __init__(self, block_size: int, total_blocks: int, watermark_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, got {block_size}")
        if total_blocks < 1:
            raise ValueError(f"kv_blocks_total must be >= 1, got {total_blocks}")
        self.block_size = block_size
        self.total = total_blocks
        self.watermark = max(0, min(watermark_blocks, total_blocks - 1))  # kept free when admitting new sequences
        self.external = 0
        self._held: dict[str, int] = {}
        self._used = 0

    @property
    def free(self) -> int:
        return max(0, self.total - self._used - self.external)

    @property
    def used(self) -> int:
        return self._used

    def held(self, seq_id: str) -> int:
        return self._held.get(seq_id, 0)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def extra(self, seq_id: str, tokens_after: int) -> int:
        """Blocks the sequence must add to hold `tokens_after` cached tokens."""
        return max(0, self.blocks_for(tokens_after) - self.held(seq_id))

    def can_grow(self, seq_id: str, tokens_after: int, keep_free: int = 0) -> bool:
        return self.extra(seq_id, tokens_after) <= self.free - keep_free

    def fit(self, seq_id: str, cached: int, want: int, keep_free: int = 0) -> int:
        """The most tokens (<= want) the sequence can add to its `cached` ones without exceeding the free blocks."""
        room_blocks = self.held(seq_id) + max(0, self.free - keep_free)
        return max(0, min(want, room_blocks * self.block_size - cached))

    def grow(self, seq_id: str, tokens_after: int) -> None:
        add = self.extra(seq_id, tokens_after)
        if add > self.free:
            raise RuntimeError(f"KV ledger overdraft: {seq_id} needs {add} blocks, {self.free} free")
        if add:
            self._held[seq_id] = self.held(seq_id) + add
            self._used += add

    def shrink_to(self, seq_id: str, cached: int) -> None:
        """Gives back reservations of a step the router refused (it applied nothing)."""
        keep = self.blocks_for(cached)
        over = self.held(seq_id) - keep
        if over > 0:
            self._held[seq_id] = keep
            self._used -= over

    def release(self, seq_id: str) -> None:
        self._used -= self._held.pop(seq_id, 0)

    def observe(self, router_free: int) -> None:
        """Reconciles with the router's own count of free blocks (after a step or a release)."""
        self.external = max(0, self.total - self._used - router_free)
