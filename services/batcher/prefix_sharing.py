"""In-flight prefix sharing: a waiting request whose leading full blocks a running sequence of the same cache salt
is still prefilling waits (bounded) until those blocks are written, then joins and hits them in the router's prefix
cache instead of computing them a second time (32 users arriving together with one system prompt: one prefill of it).

Who knows what: the router owns the cache (which blocks are indexed, hits, eviction). The batcher knows only what it
planned itself: which of its running sequences have fed which tokens (`num_cached`). Both name a block by the same
key, moemesh.runtime.prefix_cache.block_key(cache_salt(tenant, cache_salt), parent, tokens), so equal keys here mean
equal keys there, and no tenant's request ever waits on (or expects hits from) another tenant's sequence.

Invariants:
- A request asking for prompt logprobs is never held and expects no hits: the router computes its whole prompt.
- A request is held only while a RUNNING sequence with a longer common key prefix has not yet fed it, and at most
  `Policy.prefix_hold` seconds in all (then it joins and computes what is still missing): no unbounded wait.
- A held request is passed over, not queued behind: the admission pass goes on with the requests after it.
- `hits` are the tokens a joining request will find written: blocks a running sequence fed in an earlier step and
  still holds (a held block is never evicted). The scheduler does not charge them to the step's token budget.
  Rare exception: when that sequence's block is a private copy (it computed the prefix in the same step as another)
  and the indexed copy was evicted under KV pressure, the hits miss and the step computes them: one longer step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moemesh.runtime.prefix_cache import ROOT, block_key, cache_salt
from services.batcher.sequence import Sequence, Status


@dataclass(frozen=True)
class Share:
    hold: bool  # wait for a running sequence to write more of this request's prefix
    hits: int  # prompt tokens already written by a running sequence (whole blocks; the last token excluded)


NO_SHARE = Share(False, 0)


class PrefixSharing:
    def __init__(self, block_size: int, hold_seconds: float) -> None:
        self.block_size = block_size
        self.hold_seconds = hold_seconds
        self.holds = 0  # requests held at least once (a counter for tests and metrics)
        self._keys: dict[str, list[bytes]] = {}  # seq_id -> keys of its prompt's full blocks, in order
        self._since: dict[str, float] = {}  # seq_id -> clock time it was first held

    def keys(self, seq: Sequence) -> list[bytes]:
        """Block keys of the prompt's full blocks (computed once per sequence: ~1 us per block)."""
        keys = self._keys.get(seq.seq_id)
        if keys is None:
            salt, parent, bs = cache_salt(seq.tenant, seq.cache_salt), ROOT, self.block_size
            keys = []
            for start in range(0, len(seq.prompt_ids) - bs + 1, bs):
                parent = block_key(salt, parent, seq.prompt_ids[start:start + bs])
                keys.append(parent)
            self._keys[seq.seq_id] = keys
        return keys

    def look(self, seq: Sequence, running: Iterable[Sequence], now: float) -> Share:
        """Whether `seq` (waiting) should wait this step, and the tokens it would hit if it joined now."""
        mine = self.keys(seq)
        if not mine or _scores_prompt(seq):
            return NO_SHARE
        ready = coming = 0  # blocks of seq's prefix written / to be written by running sequences
        for other in running:
            if other.status is not Status.RUNNING or other is seq:
                continue
            common = _common(mine, self.keys(other))
            written = min(common, other.num_cached // self.block_size)
            ready, coming = max(ready, written), max(coming, common)
        hits = min(ready * self.block_size, (seq.length - 1) // self.block_size * self.block_size)
        if coming > ready and self._within_hold(seq.seq_id, now):
            return Share(True, hits)
        return Share(False, hits)

    def joined(self, seq_id: str) -> None:
        """The request was admitted: a later hold (after a preemption) gets a fresh bound."""
        self._since.pop(seq_id, None)

    def forget(self, seq_id: str) -> None:
        """The request finished."""
        self._keys.pop(seq_id, None)
        self._since.pop(seq_id, None)

    def hold_ends(self, now: float) -> float | None:
        """The next clock time after `now` at which a held request stops waiting (a wake-up time for an idle loop)."""
        ends = [t + self.hold_seconds for t in self._since.values() if t + self.hold_seconds > now]
        return min(ends, default=None)

    def _within_hold(self, seq_id: str, now: float) -> bool:
        if self.hold_seconds <= 0:
            return False
        since = self._since.get(seq_id)
        if since is None:
            self._since[seq_id], since = now, now
            self.holds += 1
        return now - since < self.hold_seconds


def _scores_prompt(seq: Sequence) -> bool:
    """Whether the request asks for prompt logprobs: the router then computes its whole prompt (no hits), so it
    neither waits for a prefix nor may count on one. Reads the sampling parameters only for this (a protobuf
    SamplingParams from the batcher's servicer, or the runtime's dataclass in tests and benchmarks)."""
    params = seq.sampling
    has_field = getattr(params, "HasField", None)
    if has_field is not None:
        return has_field("prompt_logprobs")
    return getattr(params, "prompt_logprobs", None) is not None


def _common(a: list[bytes], b: list[bytes]) -> int:
    """Leading equal keys (a key covers its whole prefix, so the first difference ends the match)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
