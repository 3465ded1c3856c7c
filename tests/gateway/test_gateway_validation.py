"""Bad requests get INVALID_ARGUMENT naming the field, reach no upstream, and the gateway keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from google.protobuf import json_format

from moemesh.v1 import chat_pb2, common_pb2

from gateway_harness import MODEL
from gateway_harness import AUTH, request

USER = [common_pb2.ChatMessage(role="user", content="hi")]


def STRUCT(d: dict) -> struct_pb2.Struct:
    return json_format.ParseDict(d, struct_pb2.Struct())


def VALUE(v) -> struct_pb2.Value:
    return json_format.ParseDict(v, struct_pb2.Value())


TOOL = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="get_weather", parameters=STRUCT(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})))
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
    (dict(n=9), "n: 9 choices requested; this gateway allows 1 to 8"),
    (dict(n=0), "n: 0 choices requested"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop: 5 stop strings, at most 4"),
    (dict(stop=["a", ""]), "stop[1]: empty stop string"),
    (dict(top_logprobs=3), "top_logprobs: requires logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs: 21 is not in [0, 20]"),
    *[(({name: struct_pb2.Value(string_value="auto")}), f"{name}: not supported") for name in
      ("legacy_tools", "legacy_response_format", "functions", "legacy_logit_bias", "function_call")],
    (dict(messages=[common_pb2.ChatMessage(role="user", content_parts=[
        common_pb2.ContentPart(type="text", text="a"), common_pb2.ContentPart(type="image_url")])]),
     "messages[0].content[1].type: 'image_url' parts are not supported"),
    (dict(messages=[common_pb2.ChatMessage(role="tool", content="42")]), "messages[0].tool_call_id: required"),
    (dict(response_format=chat_pb2.ResponseFormat(type="json_schema", json_schema=chat_pb2.JsonSchemaFormat(
        name="x", schema=STRUCT({"type": "objectx"})))), "response_format.json_schema.schema.type: invalid JSON Schema"),
    (dict(response_format=chat_pb2.ResponseFormat(type="xml")), "response_format.type: 'xml' is not one of"),
    (dict(tools=[TOOL], tool_choice=VALUE({"type": "function", "function": {"name": "nope"}})),
     "tool_choice.function.name: 'nope' is not one of the tools (get_weather)"),
    (dict(tool_choice=VALUE("required")), "tool_choice: 'required' but no tools are given"),
    (dict(tools=[chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(
        name="f", parameters=STRUCT({"type": "object", "properties": {"a": {"type": 5}}})))]),
     "tools[0].function.parameters.properties.a.type: invalid JSON Schema"),
    (dict(logit_bias={"abc": 1.0}), "logit_bias['abc']: keys must be token ids"),
    (dict(logit_bias={"5": 101.0}), "logit_bias['5']: 101.0 is not in [-100, 100]"),
    (dict(n=2, repetition_penalty=0.0), "repetition_penalty: 0.0 is not in (0, 2]"),
    (dict(prompt_logprobs=21), "prompt_logprobs: 21 is not in [0, 20]"),
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
