"""KV leases: the router frees the KV cache of sequences no batcher has stepped for a while.

A batcher that dies (SIGKILL, node loss) never sends Release for its running sequences; without leases their KV
blocks stay taken for the router's lifetime and every batcher death loses that much capacity. A live batcher steps
every running sequence each turn (steps take milliseconds to seconds), so a sequence untouched for `ttl` seconds
(default 30 s, far above any step) belongs to a batcher that is gone or stalled past any useful deadline. A stalled
batcher that comes back after its sequences were swept gets INVALID_ARGUMENT (unknown sequence) for them, which it
treats as a router restart (recompute), so nothing it holds is lost.

Pure bookkeeping on an injected clock: no torch, no gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class SequenceLeases:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl: {ttl!r} must be > 0 seconds")
        self.ttl, self._clock = ttl, clock
        self._touched: dict[str, float] = {}  # seq_id -> last time a Step named it

    def touch(self, seq_ids: Iterable[str]) -> None:
        now = self._clock()
        for seq_id in seq_ids:
            self._touched[seq_id] = now

    def forget(self, seq_ids: Iterable[str]) -> None:
        for seq_id in seq_ids:
            self._touched.pop(seq_id, None)

    def expired(self) -> list[str]:
        """Sequences untouched for longer than ttl; they are forgotten (the caller releases them)."""
        cutoff = self._clock() - self.ttl
        out = [s for s, t in self._touched.items() if t < cutoff]
        self.forget(out)
        return out

    def __len__(self) -> int:
        return len(self._touched)
