"""The client-side load loop: closed loop at `concurrency`, or Poisson arrivals with at most `concurrency` in flight.

A Backend sends one request and fills its RequestRecord (chunk times, token counts); this loop decides when requests
start and records failures. Closed loop: `concurrency` workers, each sending its next request as the last one
finishes. Poisson: arrivals at `rate` per second; an arrival finding `concurrency` requests in flight waits for a slot
(as vLLM's --max-concurrency), and its clock starts when it is sent. With a duration, no request is sent after it
(arrivals still waiting for a slot are dropped); requests in flight are waited for.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Protocol

from moemesh.bench.stats import RequestRecord
from moemesh.bench.workload import LoadSpec, poisson_offsets, synthetic_prompt

Clock = Callable[[], float]


class Backend(Protocol):
    async def send(self, prompt: str, spec: LoadSpec, record: RequestRecord, clock: Clock) -> None:
        """Send one streamed request; append clock() to record.chunk_times per output chunk, set the token counts;
        raise on failure."""

    async def close(self) -> None: ...


class LoadRun:
    def __init__(self, backend: Backend, spec: LoadSpec, on_done: Callable[[RequestRecord], None] | None = None,
                 clock: Clock = time.perf_counter) -> None:
        self.backend, self.spec, self.clock = backend, spec, clock
        self.on_done = on_done or (lambda record: None)
        self.records: list[RequestRecord] = []
        self._next = itertools.count()
        self._start = 0.0

    async def run(self) -> tuple[list[RequestRecord], float]:
        """(one record per request sent, wall seconds from the start to the last request's end)."""
        self._start = self.clock()
        if self.spec.rate is None:
            await asyncio.gather(*(self._worker() for _ in range(self.spec.concurrency)))
        else:
            await self._poisson()
        return self.records, self.clock() - self._start

    async def _worker(self) -> None:
        while True:
            index, now = next(self._next), self.clock()
            if not self.spec.more(index, now - self._start):
                return
            await self._one(index, now)

    async def _poisson(self) -> None:
        slots = asyncio.Semaphore(self.spec.concurrency)
        tasks = []
        for index, offset in enumerate(poisson_offsets(self.spec.rate, self.spec.seed)):
            if not self.spec.more(index, offset):
                break
            await asyncio.sleep(max(0.0, self._start + offset - self.clock()))
            tasks.append(asyncio.create_task(self._slotted(slots, index)))
        await asyncio.gather(*tasks)

    async def _slotted(self, slots: asyncio.Semaphore, index: int) -> None:
        async with slots:
            now = self.clock()
            if self.spec.duration_s is not None and now - self._start >= self.spec.duration_s:
                return  # arrived in time but found no slot before the end: never sent, not counted
            await self._one(index, now)

    async def _one(self, index: int, now: float) -> None:
        """Sends request `index`; its record starts at `now`, the instant the deadline was checked at (a start
        read after building the prompt could land past a deadline the check saw as not yet reached)."""
        prompt = synthetic_prompt(index, self.spec.prompt_tokens, self.spec.seed)
        record = RequestRecord(start=now)
        self.records.append(record)
        try:
            await self.backend.send(prompt, self.spec, record, self.clock)
        except Exception as exc:  # one failed request must not end the benchmark: it is counted and reported
            record.error = f"{type(exc).__name__}: {_first_line(exc)}"
        record.end = self.clock()
        self.on_done(record)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
