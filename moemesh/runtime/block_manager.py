"""KV block bookkeeping: a free list of fixed-size blocks and each sequence's block table (which blocks hold its
tokens, in order). Token p of a sequence lives in slot table[p // block_size] * block_size + p % block_size.

`reserve` is all-or-nothing across a whole step, so a step that does not fit changes nothing.
"""

from __future__ import annotations

from moemesh.runtime.types import CapacityError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def missing(self, seq_id: str, num_tokens: int) -> int:
        """Blocks seq_id still needs to hold num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def reserve(self, demand: dict[str, int]) -> None:
        """Grow each sequence's table to hold demand[seq_id] tokens (new ids get a table). Raises CapacityError and
        changes nothing when the free blocks do not cover the whole demand."""
        needed = sum(self.missing(s, n) for s, n in demand.items())
        if needed > len(self._free):
            raise CapacityError(f"KV cache full: step needs {needed} more blocks, {len(self._free)} of "
                                f"{self.num_blocks} free (block size {self.block_size})")
        for seq_id, num_tokens in demand.items():
            table = self._tables.setdefault(seq_id, [])
            for _ in range(self.missing(seq_id, num_tokens)):
                table.append(self._free.pop())

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep only the blocks that hold the first num_tokens tokens (0 drops the sequence)."""
        if seq_id not in self._tables:
            return
        if num_tokens == 0:
            self.free(seq_id)
            return
        table = self._tables[seq_id]
        keep = self.blocks_for(num_tokens)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]

    def free(self, seq_id: str) -> bool:
        """Return seq_id's blocks to the free list; False if it held none."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return False
        self._free.extend(reversed(table))
        return True
