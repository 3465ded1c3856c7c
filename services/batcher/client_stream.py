"""One request's stream of events to its client (the asyncio queue its Generate call reads), with the token times
the batcher's latency metrics need: time to first token, inter-token latency, queue time, end to end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from services.batcher import metrics
from services.batcher.step import Event


@dataclass
class ClientStream:
    arrival: float  # when the request was submitted (the sequence's arrival, same clock as `now` below)
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def observe(self, event: Event, now: float) -> None:
        """Records an event about to be delivered at `now` in the token and request metrics."""
        if event.token_ids:
            metrics.GENERATION_TOKENS.inc(len(event.token_ids))
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.TTFT.observe(now - self.arrival)
                metrics.QUEUE_TIME.observe(event.queue_seconds)
            else:
                metrics.ITL.observe(now - self.last_token_at)
            self.last_token_at = now
        if event.finish is not None:
            if self.first_token_at is None:
                metrics.QUEUE_TIME.observe(event.queue_seconds)
            metrics.E2E.observe(now - self.arrival)
            metrics.FINISHED.labels(event.finish.value).inc()
