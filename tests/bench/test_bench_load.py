"""The client load loop over a backend that streams on a timer (no sockets): closed loop at the concurrency,
Poisson arrivals capped at it, a duration that stops new requests, failures counted without ending the run."""

from __future__ import annotations

import asyncio
import time

import pytest

from moemesh.bench.load import LoadRun
from moemesh.bench.stats import RequestRecord, summarize
from moemesh.bench.workload import LoadSpec, poisson_offsets


class TimedBackend:
    """Streams `chunks` output chunks `gap` seconds apart; fails prompts listed in `fail`; tracks requests in flight."""

    def __init__(self, chunks: int = 4, gap: float = 0.005, fail: tuple[int, ...] = ()) -> None:
        self.chunks, self.gap, self.fail = chunks, gap, fail
        self.in_flight = self.most_in_flight = self.sent = 0
        self.prompts: list[str] = []

    async def send(self, prompt: str, spec: LoadSpec, record: RequestRecord, clock) -> None:
        index, self.sent = self.sent, self.sent + 1
        self.prompts.append(prompt)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(self.chunks):
                await asyncio.sleep(self.gap)
                record.chunk_times.append(clock())
                if index in self.fail:
                    raise RuntimeError(f"UNAVAILABLE: request {index} dropped\ntraceback...")
            record.output_tokens, record.prompt_tokens = self.chunks, len(prompt.split())
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        pass


async def test_closed_loop_keeps_concurrency_requests_in_flight():
    backend, done = TimedBackend(), []
    records, duration = await LoadRun(backend, LoadSpec(concurrency=3, requests=10, prompt_tokens=7),
                                      on_done=done.append).run()
    assert len(records) == len(done) == backend.sent == 10 and backend.most_in_flight == 3
    assert len(set(backend.prompts)) == 10 and all(len(p.split()) == 7 for p in backend.prompts)
    out = summarize(records, duration)
    assert (out["completed"], out["failed"], out["output_tokens"], out["prompt_tokens_mean"]) == (10, 0, 40, 7)
    assert out["ttft_ms"]["p50"] >= 5 and out["e2e_ms"]["p50"] >= 20 and out["itl_ms"]["p50"] >= 5


async def test_failed_requests_are_counted_and_the_run_goes_on():
    records, duration = await LoadRun(TimedBackend(fail=(1, 4)), LoadSpec(concurrency=2, requests=6)).run()
    out = summarize(records, duration)
    assert (out["completed"], out["failed"]) == (4, 2)
    assert out["errors"] == {"RuntimeError: UNAVAILABLE: request 1 dropped": 1,
                             "RuntimeError: UNAVAILABLE: request 4 dropped": 1}


async def test_poisson_requests_start_at_their_arrival_times():
    spec = LoadSpec(concurrency=64, requests=20, rate=100.0, seed=3)
    run = LoadRun(TimedBackend(chunks=1), spec)
    records, _ = await run.run()
    expected = [offset for _, offset in zip(range(20), poisson_offsets(100.0, seed=3))]
    starts = sorted(r.start - run._start for r in records)
    assert starts == pytest.approx(expected, abs=0.03)  # asyncio timer slack on a busy machine


async def test_poisson_arrivals_wait_for_a_free_slot():
    backend = TimedBackend(chunks=2, gap=0.01)
    records, _ = await LoadRun(backend, LoadSpec(concurrency=2, requests=8, rate=1000.0)).run()
    assert backend.most_in_flight == 2 and len(records) == 8 and all(r.ok for r in records)


@pytest.mark.parametrize("rate", [None, 50.0])
async def test_duration_stops_new_requests_and_waits_for_those_in_flight(rate):
    backend = TimedBackend(chunks=5, gap=0.01)
    run = LoadRun(backend, LoadSpec(concurrency=2, requests=None, duration_s=0.3, rate=rate))
    started = time.perf_counter()
    records, duration = await run.run()
    assert all(r.start - run._start < 0.3 for r in records) and all(r.ok for r in records)
    assert duration >= max(r.end for r in records) - run._start - 1e-6
    assert 3 <= len(records) <= 40 and time.perf_counter() - started < 1.5
