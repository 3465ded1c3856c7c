"""Bad requests get INVALID_ARGUMENT naming the field, reach no upstream, and the gateway keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from moemesh.v1 import common_pb2

from gateway_harness import MODEL
from gateway_harness import AUTH, request

USER = [common_pb2.ChatMessage(role="user", content="hi")]
CASES = [
    (dict(model="gpt-4"), "model: 'gpt-4' is not served"),
    (dict(model=""), "model: required"),
    (dict(messages=[]), "messages: at least one message"),
    (dict(messages=[common_pb2.ChatMessage(role="robot", content="x")]), "messages[0].role: 'robot'"),
    (dict(messages=[*USER, common_pb2.ChatMessage(role="user", content="")]), "messages[1].content: must not be empty"),
    (dict(max_tokens=-5), "max_tokens: -5 must be >= 1"),
    (dict(max_tokens=0), "max_tokens: 0 must be >= 1"),
    (dict(max_completion_tokens=-1), "max_completion_tokens: -1 must be >= 1"),
    (dict(temperature=float("nan")), "temperature: nan is not in [0, 2]"),
    (dict(temperature=2.5), "temperature: 2.5 is not in [0, 2]"),
    (dict(top_p=0.0), "top_p: 0.0 is not in (0, 1]"),
    (dict(presence_penalty=-3.0), "presence_penalty: -3.0 is not in [-2, 2]"),
    (dict(n=2), "n: 2 choices requested; only n=1 is supported"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop: 5 stop strings, at most 4"),
    (dict(stop=["a", ""]), "stop[1]: empty stop string"),
    (dict(top_logprobs=3), "top_logprobs: requires logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs: 21 is not in [0, 20]"),
    *[(({name: struct_pb2.Value(string_value="auto")}), f"{name}: not supported") for name in
      ("tools", "tool_choice", "response_format", "functions", "logit_bias", "function_call")],
]


@pytest.mark.parametrize(("fields", "message"), CASES, ids=[c[1].split(":")[0] for c in CASES])
async def test_invalid_request_names_the_field_and_gateway_keeps_serving(mesh, fields, message) -> None:
    mesh.script("fine")
    for rpc in (mesh.chat.CreateChatCompletion, mesh.chat.StreamChatCompletion):
        call = rpc(request(**fields), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if rpc is mesh.chat.StreamChatCompletion:
                [c async for c in call]
            else:
                await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(message)
    assert not mesh.batcher.requests and not mesh.metering.reserves
    ok = await mesh.chat.CreateChatCompletion(request(), metadata=AUTH)
    assert ok.choices[0].message.content == "fine"


async def test_alias_of_a_model_directory_is_accepted(tmp_path) -> None:
    from gateway.models import ModelCatalog

    catalog = ModelCatalog([str(tmp_path / "tiny-moe")])
    assert catalog.resolve("tiny-moe") == str(tmp_path / "tiny-moe")
    assert catalog.resolve(str(tmp_path / "tiny-moe")) == str(tmp_path / "tiny-moe")
    assert MODEL  # the fixture's model id is a plain name
