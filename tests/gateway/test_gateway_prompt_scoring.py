"""Prompt logprobs and echo through the gateway (the scripted batcher scores prompt token k as -k/10, see
gateway_harness._score_prompt), and the bill of n > 1: the prompt once, as usage reports it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import json_format

from moemesh.v1 import chat_pb2

from gateway_harness import AUTH, MODEL, request


def completion(**fields) -> chat_pb2.CompletionRequest:
    return chat_pb2.CompletionRequest(model=MODEL, prompt=fields.pop("prompt", "Once upon a time"), **fields)


async def test_echo_with_logprobs_leads_with_the_prompt_tokens_first_null(mesh) -> None:
    mesh.script("Hi")
    reply = await mesh.chat.CreateCompletion(completion(echo=True, logprobs=2, max_tokens=1), metadata=AUTH)
    prompt_ids = list(mesh.batcher.requests[0].prompt_ids)
    assert mesh.batcher.requests[0].sampling.prompt_logprobs == 2  # echo scores with the logprobs count
    choice = reply.choices[0]
    assert choice.text.startswith("Once upon a time") and len(choice.prompt_logprobs) == 0  # not asked as such
    body = json_format.MessageToDict(choice.logprobs, preserving_proto_field_name=True)
    p = len(prompt_ids)
    assert len(body["tokens"]) == p + 1 == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert "".join(body["tokens"][:p]) == "Once upon a time"
    assert body["token_logprobs"][0] is None and body["top_logprobs"][0] is None  # OpenAI's shape
    assert body["token_logprobs"][1:p] == pytest.approx([-k / 10 for k in range(1, p)])
    assert body["token_logprobs"][p] == -0.5  # the generated token's (scripted)
    assert len(body["top_logprobs"][1]) == 2 and body["text_offset"][:2] == [0, len(body["tokens"][0])]
    assert list(choice.logprobs.numeric_token_logprobs[:2]) == [0.0, -0.1]  # gRPC's numbers: 0 for the null


async def test_prompt_logprobs_are_typed_over_grpc_for_chat_and_completions(mesh) -> None:
    mesh.script("Hi")
    chat = await mesh.chat.CreateChatCompletion(request(prompt_logprobs=1, max_tokens=1), metadata=AUTH)
    prompt_ids = list(mesh.batcher.requests[0].prompt_ids)
    entries = chat.prompt_logprobs
    assert [e.token_id for e in entries] == prompt_ids
    assert not entries[0].HasField("logprob") and entries[1].logprob == pytest.approx(-0.1)
    assert [a.logprob for a in entries[1].top_logprobs] == [-0.5] and entries[1].token
    reply = await mesh.chat.CreateCompletion(completion(prompt_logprobs=0, max_tokens=1), metadata=AUTH)
    assert len(reply.choices[0].prompt_logprobs) == reply.usage.prompt_tokens
    assert reply.choices[0].text == "Hi"  # no echo: the text is the completion's


async def test_prompt_scoring_is_refused_on_streams_and_out_of_range(mesh) -> None:
    mesh.script("Hi")
    for rpc, req, field in ((mesh.chat.StreamCompletion, completion(echo=True), "echo"),
                            (mesh.chat.StreamChatCompletion, request(prompt_logprobs=1), "prompt_logprobs"),
                            (mesh.chat.CreateCompletion, completion(prompt_logprobs=21), "prompt_logprobs")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = rpc(req, metadata=AUTH)
            if rpc is mesh.chat.CreateCompletion:
                await call
            else:
                [c async for c in call]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)
    assert not mesh.batcher.requests


async def test_n_choices_bill_the_prompt_once_as_usage_reports_it(mesh) -> None:
    mesh.script("Hi")
    reply = await mesh.chat.CreateChatCompletion(request(n=3, prompt_logprobs=0), metadata=AUTH)
    prompt = reply.usage.prompt_tokens
    assert prompt > 0 and len(reply.choices) == 3 and len(reply.prompt_logprobs) == prompt
    scoring = [r.sampling.HasField("prompt_logprobs") for r in mesh.batcher.requests]
    assert sorted(scoring) == [False, False, True]  # one choice scores the prompt for all
    for _ in range(50):
        if len(mesh.metering.commits) == 3:
            break
        await asyncio.sleep(0.05)
    commits = mesh.metering.commits
    assert sum(c.prompt_tokens for c in commits) == prompt  # billed once, like usage
    assert sum(c.completion_tokens for c in commits) == reply.usage.completion_tokens
    assert sorted(r.prompt_tokens for r in mesh.metering.reserves) == [0, 0, prompt]


async def test_echo_with_max_tokens_zero_scores_the_prompt_only(mesh) -> None:
    mesh.script("Hi")
    reply = await mesh.chat.CreateCompletion(completion(echo=True, logprobs=0, max_tokens=0), metadata=AUTH)
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason) == ("Once upon a time", "length")
    assert len(choice.logprobs.tokens) == reply.usage.prompt_tokens and reply.usage.completion_tokens == 0
    assert mesh.batcher.requests[0].sampling.max_tokens == 1  # the engine samples once; that token is dropped
    for _ in range(50):
        if mesh.metering.commits:
            break
        await asyncio.sleep(0.05)
    assert mesh.metering.commits[0].completion_tokens == 0
    with pytest.raises(grpc.aio.AioRpcError) as info:  # without echo, 0 stays an error
        await mesh.chat.CreateCompletion(completion(max_tokens=0), metadata=AUTH)
    assert info.value.details().startswith("max_tokens: 0 must be >= 1")
