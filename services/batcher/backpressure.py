"""Backpressure from slow readers: a request whose client does not read stops being scheduled (no grpc here).

Each request's events wait in its StreamBuffer until the Generate handler writes them; the handler's write waits on
HTTP/2 flow control, so a buffer grows only while the gateway (hence its client) does not take the stream's events.
Once a buffer holds more than `high` undelivered events, the engine parks the sequence: it leaves the batch (its KV
cache is released, as after a preemption) and the fair queue skips it; when the handler has taken the buffer down to
`low` events, the sequence is queued again (in fair order, recomputing prompt + output). Generation for a stalled
client stops within `high` tokens, so its work and memory are bounded, and the batch slots go to readers.

Why high = 128 and low = 0: a resume costs a recompute of the whole sequence (no KV is kept while parked), so each
resume must buy many tokens. Measured (benchmarks/slow_readers.py, 40 readers of 1 chunk/s, 64 KiB windows): with
32/8 the readers were parked and resumed every ~25 s, and the recomputes raised the other tenant's p99 from 1.5 s to
18.7 s. With 128/0 a reader of 1 chunk/s resumes at most every ~2 minutes.

A parked sequence whose client took nothing for `stall_s` seconds is ended (finish CANCELLED): its client gets that
finish when it reads again, or nothing if it never does; the gRPC deadline ends the call itself.

Chain of buffers from the engine to a client (each bounded): StreamBuffer (<= high + 1 events) -> the
batcher->gateway HTTP/2 stream window (the gateway's channel: gateway/upstream.BATCHER_CHANNEL_OPTIONS) -> one event
in the gateway -> the gateway->client window (the client's HTTP/2 setting; Envoy's for HTTP clients, deploy/envoy).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)
HIGH_EVENTS = 128  # undelivered events of one request that park it
LOW_EVENTS = 0  # ... and at which it is queued again (hysteresis: a resume costs a recompute; see above)
STALL_S = 120.0  # seconds a parked sequence's client may take nothing before the sequence is ended


@dataclass(frozen=True)
class Limits:
    high: int = HIGH_EVENTS
    low: int = LOW_EVENTS
    stall_s: float = STALL_S

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"stream buffer: need 0 <= low < high, got low={self.low!r}, high={self.high!r}")
        if not self.stall_s > 0:
            raise ValueError(f"stall_s must be > 0 seconds, got {self.stall_s!r}")


class StreamBuffer(asyncio.Queue):
    """A request's undelivered events. put_nowait never blocks (the engine loop must not); get() records progress
    and reports, through `on_low`, when a parked request's buffer is down to the low mark."""

    def __init__(self, low: int, on_low: Callable[[], None], clock: Callable[[], float]) -> None:
        super().__init__()
        self.parked_at: float | None = None  # engine clock time it was parked; None: scheduled normally
        self.taken_at = clock()  # when the handler last took an event (or the buffer was made)
        self._low, self._on_low, self._clock = low, on_low, clock

    async def get(self):
        item = await super().get()
        self.taken_at = self._clock()
        if self.parked_at is not None and self.qsize() <= self._low:
            self.parked_at = None
            self._on_low()
        return item


class Backpressure:
    """Decides which streams are parked, resumed or ended; the engine loop applies it to its scheduler."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits, self.clock = limits, clock
        self.parks = 0  # times a sequence was parked

    def buffer(self, on_low: Callable[[], None]) -> StreamBuffer:
        return StreamBuffer(self.limits.low, on_low, self.clock)

    def should_park(self, buffer: StreamBuffer) -> bool:
        """After an event was put: True once, when the buffer first exceeds the high mark (the caller parks)."""
        if buffer.parked_at is None and buffer.qsize() > self.limits.high:
            buffer.parked_at = self.clock()
            self.parks += 1
            return True
        return False

    def stalled(self, buffers: dict[str, StreamBuffer]) -> list[str]:
        """Parked requests whose client took nothing for stall_s seconds (the caller ends them)."""
        limit = self.clock() - self.limits.stall_s
        return [seq_id for seq_id, b in buffers.items() if b.parked_at is not None and b.taken_at < limit]

    async def end_stalled(self, buffers: Callable[[], dict[str, StreamBuffer]], cancel: Callable[[str], object],
                          every: float = 1.0) -> None:
        """Runs until cancelled: every `every` seconds, cancels the stalled requests (the engine loop's task)."""
        while True:
            await asyncio.sleep(every)
            for seq_id in self.stalled(buffers()):
                log.info("%s: its client read nothing for %.0f s while parked: cancelled", seq_id, self.limits.stall_s)
                cancel(seq_id)
