"""Chat completions through the gateway: text, streaming shape, stop strings, usage and metering."""

from __future__ import annotations

import asyncio
import math
import re

import grpc
import pytest

from moemesh.v1 import chat_pb2

from gateway_harness import AUTH, MODEL, request


async def test_unary_completion_text_usage_and_bill(mesh) -> None:
    mesh.script("Hello, world!")
    response = await mesh.chat.CreateChatCompletion(request(), metadata=AUTH)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", response.id) and response.object == "chat.completion"
    assert response.model == MODEL and len(response.choices) == 1
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "Hello, world!", "stop")
    generate = mesh.batcher.requests[0]
    assert generate.request_id == response.id and generate.tenant == "acme" and generate.tenant_weight == 2.0
    assert response.usage.prompt_tokens == len(generate.prompt_ids) > 0
    assert response.usage.completion_tokens == len(mesh.batcher.script) + 1  # the EOS token counts
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    await asyncio.wait_for(mesh.metering.committed.wait(), 5)
    reserve, commit = mesh.metering.reserves[0], mesh.metering.commits[0]
    assert (reserve.request_id, reserve.tenant, reserve.max_completion_tokens) == (response.id, "acme", 64)
    assert (commit.request_id, commit.finish_reason, commit.key_id, commit.engine_seconds) == (response.id, "stop", "k1", 0.25)
    assert commit.completion_tokens == response.usage.completion_tokens


async def test_sampling_parameters_reach_the_batcher(mesh) -> None:
    mesh.script("x")
    await mesh.chat.CreateChatCompletion(request(temperature=0.0, top_p=0.5, seed=-1, max_tokens=7, top_k=3),
                                         metadata=AUTH)
    sampling = mesh.batcher.requests[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.0, 0.5, 3, 7)
    assert sampling.seed == 2**64 - 1 and mesh.batcher.requests[0].deadline_unix_ms > 0


async def test_stream_chunks_shape(mesh) -> None:
    mesh.script("Hi there 🙂 friend")
    chunks = [c async for c in mesh.chat.StreamChatCompletion(
        request(stream_options=chat_pb2.StreamOptions(include_usage=True)), metadata=AUTH)]
    first, *middle, last_choice, usage = chunks
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(not c.choices[0].delta.HasField("role") for c in middle)
    assert "".join(c.choices[0].delta.content for c in middle) == "Hi there 🙂 friend"
    assert all("\ufffd" not in c.choices[0].delta.content for c in middle)
    assert last_choice.choices[0].finish_reason == "stop" and not last_choice.HasField("usage")
    assert not usage.choices and usage.usage.completion_tokens == len(mesh.batcher.script) + 1


async def test_ignore_eos_reaches_the_batcher_only_when_asked(mesh) -> None:
    mesh.script("x")
    await mesh.chat.CreateChatCompletion(request(max_tokens=4, ignore_eos=True), metadata=AUTH)
    await mesh.chat.CreateChatCompletion(request(max_tokens=4), metadata=AUTH)
    assert [r.sampling.ignore_eos for r in mesh.batcher.requests] == [True, False]


async def test_stop_string_cuts_text_and_cancels_the_batcher(mesh) -> None:
    mesh.script("one two three four five six seven eight nine ten", delay=0.02)
    response = await mesh.chat.CreateChatCompletion(request(stop=["three", "zzz"]), metadata=AUTH)
    assert response.choices[0].message.content == "one two " and response.choices[0].finish_reason == "stop"
    assert mesh.batcher.cancels == [response.id]
    assert "stop" not in mesh.batcher.requests[0].sampling.stop  # stop strings stay in the gateway
    await asyncio.wait_for(mesh.metering.committed.wait(), 5)
    assert mesh.metering.commits[0].engine_seconds == 0.5  # from the batcher's last (cancelled) event


async def test_stop_string_split_across_tokens_never_leaks_in_a_stream(mesh) -> None:
    mesh.script("alpha beta gamma delta")
    chunks = [c async for c in mesh.chat.StreamChatCompletion(request(stop=["a gam"]), metadata=AUTH)]
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text == "alpha bet" and chunks[-1].choices[0].finish_reason == "stop"


async def test_max_tokens_finishes_with_length(mesh) -> None:
    mesh.script("a b c d e f g h")
    response = await mesh.chat.CreateChatCompletion(request(max_completion_tokens=3, max_tokens=100), metadata=AUTH)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3
    assert mesh.batcher.requests[0].sampling.max_tokens == 3  # max_completion_tokens wins


async def test_logprobs_carry_token_text_bytes_and_alternatives(mesh) -> None:
    mesh.script("Hi 𝄞")
    response = await mesh.chat.CreateChatCompletion(request(logprobs=True, top_logprobs=2), metadata=AUTH)
    content = response.choices[0].logprobs.content
    assert len(content) == len(mesh.batcher.script) + 1
    assert b"".join(bytes(c.bytes) for c in content[:-1]) == "Hi 𝄞".encode()
    assert all(c.logprob == -0.5 and len(c.top_logprobs) == 2 for c in content)
    assert math.isclose(content[0].top_logprobs[1].logprob, -1.5)


async def test_list_models(mesh) -> None:
    response = await mesh.chat.ListModels(chat_pb2.ListModelsRequest(), metadata=AUTH)
    assert response.object == "list" and [(m.id, m.object, m.owned_by) for m in response.data] == [
        (MODEL, "model", "moemesh")
    ]


async def test_auth_missing_and_bad_keys_are_unauthenticated_and_good_keys_cached(mesh) -> None:
    mesh.script("ok")
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "Basic abc"),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.chat.CreateChatCompletion(request(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in info.value.details()
    calls = mesh.metering.authenticated
    await mesh.chat.CreateChatCompletion(request(), metadata=AUTH)
    await mesh.chat.CreateChatCompletion(request(), metadata=AUTH)
    assert mesh.metering.authenticated == calls + 1


async def test_cache_salt_reaches_the_batcher_and_cached_tokens_are_reported_and_billed(mesh) -> None:
    mesh.script("Hi")
    mesh.batcher.cached_tokens = 16
    response = await mesh.chat.CreateChatCompletion(request(cache_salt="user-42"), metadata=AUTH)
    generate = mesh.batcher.requests[0]
    assert (generate.tenant, generate.cache_salt) == ("acme", "user-42")  # the tenant comes from the API key
    assert response.usage.prompt_tokens_details.cached_tokens == 16 < response.usage.prompt_tokens
    await asyncio.wait_for(mesh.metering.committed.wait(), 5)
    assert mesh.metering.commits[0].cached_tokens == 16
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await mesh.chat.CreateChatCompletion(request(cache_salt="a\x00b"), metadata=AUTH)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in bad.value.details()
