"""KV block bookkeeping: ref-counted fixed-size blocks, each sequence's block table (which blocks hold its tokens, in
order), and the prefix cache. Token p of a sequence lives in slot table[p // block_size] * block_size + p % block_size.

Sharing (prefix_cache on): only full blocks whose K/V are written are shared (`commit` indexes them, prefix_cache.py
keys them); a sequence that diverges inside a block gets a fresh block for that block and recomputes its tokens, so a
shared block is never written again (no copy-on-write needed). A sequence adopts shared blocks with `match` only at a
block boundary of its own tokens.

Counts: `free_blocks` is what an allocation can take: truly free blocks plus idle cached ones (evicted LRU on
demand). `own(seq)` is how many of its blocks no other sequence holds: what releasing it gives back. `reserve` is
all-or-nothing across a whole step, so a step that does not fit changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moemesh.runtime.prefix_cache import ROOT, PrefixIndex, block_key
from moemesh.runtime.types import CapacityError


@dataclass
class _Chain:
    """A sequence's position in the hash chain: keys cover its first `hashed` blocks; `tail` holds the tokens after."""

    salt: str
    parent: bytes = ROOT
    hashed: int = 0
    tail: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_cache: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self._tables: dict[str, list[int]] = {}
        self._chains: dict[str, _Chain] = {}
        self._ref = [0] * num_blocks
        self._holders: dict[int, set[str]] = {}  # block -> sequences holding it
        self._own: dict[str, int] = {}
        self._dirty: set[str] = set()  # sequences whose own() changed because of another sequence
        self.index = PrefixIndex()

    @property
    def free_blocks(self) -> int:
        return len(self._free) + self.index.idle

    @property
    def cached_blocks(self) -> int:
        """Idle blocks kept for their prefix (counted in free_blocks too)."""
        return self.index.idle

    @property
    def sequences(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def own(self, seq_id: str) -> int:
        return self._own.get(seq_id, 0)

    def take_dirty(self) -> set[str]:
        out, self._dirty = self._dirty, set()
        return out

    def missing(self, seq_id: str, num_tokens: int) -> int:
        """Blocks seq_id still needs to hold num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    # ---- the prefix cache ---------------------------------------------------------------------------------------

    def match(self, seq_id: str, salt: str, position: int, token_ids: list[int], limit: int) -> int:
        """Adopts the indexed blocks that hold token_ids (fed at `position`), up to `limit` tokens, whole blocks only;
        returns the tokens adopted (0 without a hit). Undo with truncate(seq_id, position)."""
        chain = self._chains.setdefault(seq_id, _Chain(salt)) if self.prefix_cache else None
        bs = self.block_size
        if chain is None or position % bs or chain.hashed * bs != position or chain.tail:
            return 0
        table = self._tables.setdefault(seq_id, [])
        parent, hit = chain.parent, 0
        while hit + bs <= limit:  # the chain's salt: works after position 0 name none (it is sent once, at 0)
            parent = block_key(chain.salt, parent, token_ids[hit:hit + bs])
            block = self.index.lookup(parent)
            if block is None:
                break
            if self._ref[block] == 0:
                self.index.unpark(block)
            self._incref(block, seq_id)
            table.append(block)
            hit += bs
        return hit

    def commit(self, seq_id: str, token_ids: list[int]) -> None:
        """token_ids (hit or computed) now sit in the sequence's blocks: index every block they complete."""
        chain = self._chains.get(seq_id)
        if chain is None or chain.hashed < 0:
            return
        chain.tail.extend(token_ids)
        table, bs = self._tables[seq_id], self.block_size
        while len(chain.tail) >= bs:
            chain.parent = block_key(chain.salt, chain.parent, chain.tail[:bs])
            self.index.register(table[chain.hashed], chain.parent)
            chain.hashed += 1
            del chain.tail[:bs]

    # ---- allocation ---------------------------------------------------------------------------------------------

    def reserve(self, demand: dict[str, int]) -> None:
        """Grow each sequence's table to hold demand[seq_id] tokens (new ids get a table). Raises CapacityError and
        changes nothing when the free blocks do not cover the whole demand."""
        needed = sum(self.missing(s, n) for s, n in demand.items())
        if needed > self.free_blocks:
            raise CapacityError(f"KV cache full: step needs {needed} more blocks, {self.free_blocks} of "
                                f"{self.num_blocks} free (block size {self.block_size})")
        for seq_id, num_tokens in demand.items():
            table = self._tables.setdefault(seq_id, [])
            for _ in range(self.missing(seq_id, num_tokens)):
                block = self._free.pop() if self._free else self.index.evict()
                self._incref(block, seq_id)
                table.append(block)

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep only the blocks that hold the first num_tokens tokens (0 drops the sequence)."""
        if seq_id not in self._tables:
            return
        if num_tokens == 0:
            self.free(seq_id)
            return
        table = self._tables[seq_id]
        keep = self.blocks_for(num_tokens)
        for block in reversed(table[keep:]):
            self._decref(block, seq_id)
        del table[keep:]
        chain = self._chains.get(seq_id)
        if chain is not None and chain.hashed > keep:  # cannot happen on a rollback (keys come after the step)
            self._chains[seq_id] = _Chain(chain.salt, hashed=-1)  # stop indexing this sequence's blocks

    def free(self, seq_id: str) -> bool:
        """Drop seq_id's hold on its blocks (shared and cached ones stay); False if it held none."""
        table = self._tables.pop(seq_id, None)
        self._chains.pop(seq_id, None)
        if table is None:
            return False
        for block in reversed(table):
            self._decref(block, seq_id)
        self._own.pop(seq_id, None)
        self._dirty.discard(seq_id)
        return True

    def _incref(self, block: int, seq_id: str) -> None:
        self._ref[block] += 1
        holders = self._holders.setdefault(block, set())
        if self._ref[block] == 1:
            self._own[seq_id] = self.own(seq_id) + 1
        elif self._ref[block] == 2:  # the sole holder no longer owns it alone
            (other,) = holders
            self._own[other] -= 1
            self._dirty.add(other)
        holders.add(seq_id)

    def _decref(self, block: int, seq_id: str) -> None:
        holders = self._holders[block]
        holders.discard(seq_id)
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._own[seq_id] -= 1
            del self._holders[block]
            if not self.index.park(block):
                self._free.append(block)
        elif self._ref[block] == 1:  # the remaining holder now owns it alone
            (other,) = holders
            self._own[other] = self.own(other) + 1  # it may have held only shared blocks so far
            self._dirty.add(other)
