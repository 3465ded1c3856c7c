"""Streams end in-band before a drain's grace is over (gateway/closing.py), and the stream's own cleanup (where the
commit runs) still happens, also when the caller goes away."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.closing import MARGIN_S, Closing, GatewayClosing


async def _endless(cleaned: list[str]):
    try:
        n = 0
        while True:
            await asyncio.sleep(0.01)
            n += 1
            yield n
    finally:
        cleaned.append("committed")


async def test_a_drain_ends_the_stream_margin_before_the_grace_and_cleans_up() -> None:
    closing, cleaned, got = Closing(), [], []
    start = time.monotonic()
    closing.begin(MARGIN_S + 0.3)
    with pytest.raises(GatewayClosing, match="shutting down.*retry the request"):
        async for n in closing.guard(_endless(cleaned)):
            got.append(n)
    assert 0.25 < time.monotonic() - start < 1.0 and len(got) > 5 and closing.closed
    assert cleaned == ["committed"]


async def test_a_stream_that_ends_first_is_untouched() -> None:
    async def three():
        for n in range(3):
            yield n

    assert [n async for n in Closing().guard(three())] == [0, 1, 2]


async def test_a_caller_going_away_cancels_the_stream() -> None:
    cleaned: list[str] = []

    async def consume() -> None:
        async for _ in Closing().guard(_endless(cleaned)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert cleaned == ["committed"]


async def test_the_cut_leaves_the_task_uncancelled_and_a_later_stream_ends_at_once() -> None:
    closing, cleaned = Closing(), []
    closing.begin(MARGIN_S)  # closes on the next loop turn
    with pytest.raises(GatewayClosing):
        async for _ in closing.guard(_endless(cleaned)):
            pass
    # the drain's cancellation was turned into GatewayClosing: this task is not left cancelling
    assert asyncio.current_task().cancelling() == 0 and cleaned == ["committed"]
    await asyncio.sleep(0.02)  # the task goes on awaiting normally
    with pytest.raises(GatewayClosing):
        async for _ in closing.guard(_endless(cleaned)):
            pytest.fail("no item after the gateway closed")
