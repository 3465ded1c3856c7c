"""The prefix cache's index: which KV block holds which full block of tokens, under which salt, after which prefix.

A full block's key is hash(salt, parent key, its block_size token ids): equal keys mean equal salt and equal tokens
from position 0 to the block's end, hence equal K/V in every layer (K/V of a token depends only on the tokens up to
it). The salt (the authenticated tenant, plus the client's optional cache_salt) goes into the first block's key and
so into every key after it: two tenants never produce the same key, so no sequence ever reads another tenant's blocks.

Blocks no sequence holds stay indexed ("idle") until their slots are needed: an LRU order picks which to evict.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT = b""  # the parent key of a sequence's first block


def cache_salt(tenant: str, client_salt: str = "") -> str:
    """The namespace of a sequence's blocks: its tenant always, the client's salt within it (NUL cannot occur in
    either as the gateway passes them, so no tenant/salt pair can spell another's)."""
    return f"{tenant}\x00{client_salt}" if client_salt else tenant


def block_key(salt: str, parent: bytes, tokens: Sequence[int]) -> bytes:
    """16-byte key of a full block (blake2b: collisions are out of reach, unlike Python's 64-bit hash)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(salt.encode())
    h.update(b"\x00")  # salt "a" + parent "bc" never equals salt "ab" + parent "c": parents have a fixed size
    h.update(parent)
    h.update(array("I", tokens).tobytes())
    return h.digest()


class PrefixIndex:
    """key -> block id of full blocks whose K/V are written; the idle ones (no holder) in least-recently-used order."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.evictions = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def indexed(self) -> int:
        return len(self._block_of)

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def register(self, block: int, key: bytes) -> None:
        """Indexes a freshly filled block, unless an equal block is indexed already (two sequences that computed
        the same prefix in one step: the first one wins, the other's copy stays private and is freed normally)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def park(self, block: int) -> bool:
        """The last holder let go: keep an indexed block for reuse (True), or report it free (False)."""
        if block not in self._key_of:
            return False
        self._idle[block] = None
        return True

    def unpark(self, block: int) -> None:
        """An idle block is held again (a cache hit)."""
        self._idle.pop(block, None)

    def evict(self) -> int | None:
        """Drops the least recently used idle block from the index and returns it (None: nothing idle)."""
        if not self._idle:
            return None
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.evictions += 1
        return block
