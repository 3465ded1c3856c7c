"""Several batchers behind one gateway (M:N: one batcher per data-parallel router replica).

BatcherPicker (no sockets) chooses a batcher per request: the one with the fewest outstanding requests (streams the
gateway has open on it), skipping batchers marked down; a batcher marked down after UNAVAILABLE is skipped for
DOWN_S, then tried again (supervision restarts it on its port). When every batcher is down the least recently failed
one is tried anyway: an error from a real attempt says more than a refusal here.

PooledBatcher has BatcherClient's `generate`: a request's stream stays on the batcher that sent its first event;
before that (not yet admitted: the batcher never answered) UNAVAILABLE moves it to the next batcher it has not tried.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence

from gateway.events import GenerateParams, TokenEvent
from gateway.upstream import BatcherClient, PeerLost

DOWN_S = 5.0  # how long a batcher that answered UNAVAILABLE is skipped


class BatcherPicker:
    """Least-outstanding choice among `names`; `acquire` / `release` count a request's stream on a batcher."""

    def __init__(self, names: Sequence[str], clock: Callable[[], float] = time.monotonic, down_s: float = DOWN_S):
        if not names:
            raise ValueError("batchers: empty list: give at least one batcher address")
        if len(set(names)) != len(names):
            raise ValueError(f"batchers: {list(names)} lists an address twice")
        self.names = tuple(names)
        self._clock, self._down_s = clock, down_s
        self.outstanding = {n: 0 for n in names}
        self._down_since: dict[str, float] = {}
        self._next = 0  # round-robin start among ties, so that idle batchers share the load too

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> str | None:
        """The batcher for the next attempt (not in `exclude`), or None when every one was tried."""
        now = self._clock()
        candidates = [n for n in self._rotated() if n not in exclude]
        if not candidates:
            return None
        up = [n for n in candidates if now - self._down_since.get(n, -float("inf")) >= self._down_s]
        if not up:  # all down: the one that failed longest ago
            return min(candidates, key=lambda n: self._down_since[n])
        choice = min(up, key=lambda n: self.outstanding[n])  # min keeps the first of ties (rotated order)
        self._next = (self.names.index(choice) + 1) % len(self.names)
        return choice

    def _rotated(self) -> list[str]:
        return [*self.names[self._next:], *self.names[:self._next]]

    def acquire(self, name: str) -> None:
        self.outstanding[name] += 1

    def release(self, name: str) -> None:
        if self.outstanding[name] <= 0:
            raise RuntimeError(f"batcher {name}: released more requests than acquired")
        self.outstanding[name] -= 1

    def mark_down(self, name: str) -> None:
        self._down_since[name] = self._clock()

    def mark_up(self, name: str) -> None:
        self._down_since.pop(name, None)

    def is_down(self, name: str) -> bool:
        return self._clock() - self._down_since.get(name, -float("inf")) < self._down_s


class PooledBatcher:
    """BatcherClient's interface over several batchers (address -> BatcherClient)."""

    def __init__(self, clients: dict[str, BatcherClient], picker: BatcherPicker | None = None) -> None:
        self._clients = clients
        self.picker = picker or BatcherPicker(list(clients))

    def generate(self, params: GenerateParams, timeout_s: float | None) -> PooledGeneration:
        return PooledGeneration(self, params, timeout_s)

    def _start(self, name: str, params: GenerateParams, timeout_s: float | None):
        self.picker.acquire(name)
        return self._clients[name].generate(params, timeout_s)


class PooledGeneration:
    """Generation's interface; the underlying call moves to another batcher only before its first event."""

    def __init__(self, pool: PooledBatcher, params: GenerateParams, timeout_s: float | None) -> None:
        self._pool, self._params, self._timeout_s = pool, params, timeout_s
        self._tried: set[str] = set()
        self.batcher = self._next_batcher()
        self._call = pool._start(self.batcher, params, timeout_s)
        self._held = True  # the picker counts this request on self.batcher until cancel()

    def _next_batcher(self) -> str:
        name = self._pool.picker.pick(self._tried)
        if name is None:
            raise RuntimeError("no batcher left to try")  # callers check `_tried` first; kept as a guard
        self._tried.add(name)
        return name

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            started = False
            try:
                async for event in self._call.events():
                    if not started:
                        started = True
                        self._pool.picker.mark_up(self.batcher)
                    yield event
                return
            except PeerLost:
                if started or len(self._tried) == len(self._pool.picker.names):
                    raise  # admitted (its tokens were streamed), or nothing left to try
                self._pool.picker.mark_down(self.batcher)
                self._move()

    def _move(self) -> None:
        """Re-sends the request to the next batcher (the previous call ended without an event)."""
        self.cancel()
        self.batcher = self._next_batcher()
        self._call = self._pool._start(self.batcher, self._params, self._timeout_s)
        self._held = True

    async def stop_early(self) -> TokenEvent | None:
        try:
            return await self._call.stop_early()
        finally:
            self._release()

    def cancel(self) -> None:
        self._call.cancel()
        self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._pool.picker.release(self.batcher)


def pool_from_addresses(addresses: Sequence[str],
                        make_channel: Callable[[str], object]) -> BatcherClient | PooledBatcher:
    """One batcher: the plain client; several: the pool (channels from make_channel(address))."""
    if len(addresses) == 1:
        return BatcherClient(make_channel(addresses[0]))
    return PooledBatcher({a: BatcherClient(make_channel(a)) for a in addresses})
