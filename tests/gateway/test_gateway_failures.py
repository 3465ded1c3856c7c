"""Upstream failures and departing clients: real statuses before the first chunk, in-band errors after it,
cancellation reaches the batcher, and the bill is still committed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from moemesh.errors import ErrorStatus
from moemesh.serving import ServiceError

from gateway_harness import AUTH, request


async def test_batcher_refusal_before_first_chunk_is_a_real_status_with_retry_hint(mesh) -> None:
    mesh.script("x", refuse=ServiceError("queue full", status=ErrorStatus.RESOURCE_EXHAUSTED, retry_after_ms=250))
    call = mesh.chat.StreamChatCompletion(request(), metadata=AUTH)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [c async for c in call]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.details() == "queue full"
    assert ("retry-after-ms", "250") in tuple(await call.trailing_metadata())
    await asyncio.wait_for(mesh.metering.committed.wait(), 5)
    refused = mesh.metering.commits[0]  # never ran: the hold is released at once and nothing is billed
    assert (refused.finish_reason, refused.prompt_tokens, refused.completion_tokens) == ("rejected", 0, 0)


async def test_failure_after_first_chunk_arrives_in_band(mesh) -> None:
    mesh.script("one two three four", fail_after=2)
    chunks = [c async for c in mesh.chat.StreamChatCompletion(request(), metadata=AUTH)]
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.HasField("error") and last.error.code == "INTERNAL" and last.error.type == "server_error"
    assert not any(c.choices and c.choices[0].HasField("finish_reason") for c in chunks)


async def test_unary_failure_is_internal_not_unknown(mesh) -> None:
    mesh.script("one two three", fail_after=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.chat.CreateChatCompletion(request(), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INTERNAL


async def test_client_going_away_cancels_the_batcher_and_commits_cancelled(mesh) -> None:
    mesh.script(" ".join(["word"] * 50), delay=0.05)
    call = mesh.chat.StreamChatCompletion(request(), metadata=AUTH)
    async for chunk in call:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    call.cancel()
    await asyncio.wait_for(mesh.batcher.client_cancelled.wait(), 5)
    await asyncio.wait_for(mesh.metering.committed.wait(), 5)
    commit = mesh.metering.commits[0]
    assert commit.finish_reason == "cancelled" and 0 < commit.completion_tokens < 50


async def test_deadline_from_the_client_reaches_the_batcher(mesh) -> None:
    mesh.script("x")
    sent_ms = time.time() * 1000
    await mesh.chat.CreateChatCompletion(request(), metadata=AUTH, timeout=7)
    deadline_ms = mesh.batcher.requests[0].deadline_unix_ms
    assert sent_ms + 1000 < deadline_ms <= sent_ms + 7000 + 50  # the client's 7 s, not the gateway's 30 s default
