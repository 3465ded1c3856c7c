"""Issue 17 through the real edge with the official openai client, on the tiny MoE mesh: structured output
(json_schema, json_object), tool calls (named, required, streamed deltas), n choices, content as text parts,
/v1/completions, and the 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from edge_harness import EdgeMesh

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def _client(mesh: EdgeMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=mesh.api_key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=mesh.ca_cert))


def test_json_schema_output_validates(edge_mesh: EdgeMesh) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(5):  # random weights, sampled: the grammar alone makes it valid (and closes it in time)
        reply = _client(edge_mesh).chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=40,
                                                           temperature=1.0, seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_json_object_output_parses(edge_mesh: EdgeMesh) -> None:
    reply = _client(edge_mesh).chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=30,
                                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_named_tool_call_has_valid_arguments_and_streams_the_same_call(edge_mesh: EdgeMesh) -> None:
    client = _client(edge_mesh)
    args = dict(model=edge_mesh.model, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=30, temperature=0,
                tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    reply = client.chat.completions.create(**args)
    call = reply.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(**args, stream=True))
    fragments = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert fragments[0].id and fragments[0].function.name == "get_weather"
    assert "".join(f.function.arguments or "" for f in fragments) == call.function.arguments  # greedy: same call


def test_required_tool_choice_picks_a_declared_tool(edge_mesh: EdgeMesh) -> None:
    reply = _client(edge_mesh).chat.completions.create(
        model=edge_mesh.model, messages=[{"role": "user", "content": "Weather?"}], max_tokens=40,
        tools=[WEATHER, TIME], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name in ("get_weather", "get_time")
    json.loads(choice.message.tool_calls[0].function.arguments)


def test_tool_history_is_accepted(edge_mesh: EdgeMesh) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = _client(edge_mesh).chat.completions.create(model=edge_mesh.model, messages=messages, max_tokens=3,
                                                       tools=[WEATHER])
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_n_three_returns_three_choices_streamed_or_not(edge_mesh: EdgeMesh) -> None:
    client = _client(edge_mesh)
    reply = client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=4, n=3, seed=1)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    chunks = list(client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=4, n=3,
                                                 stream=True))
    assert {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason} == {0, 1, 2}


def test_text_parts_are_answered_like_the_same_string(edge_mesh: EdgeMesh) -> None:
    client = _client(edge_mesh)
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]
    as_parts = client.chat.completions.create(model=edge_mesh.model, max_tokens=6, temperature=0,
                                              messages=[{"role": "developer", "content": "Be brief.", "name": "d"},
                                                        {"role": "user", "content": parts}])
    as_text = client.chat.completions.create(model=edge_mesh.model, max_tokens=6, temperature=0,
                                             messages=[{"role": "developer", "content": "Be brief.", "name": "d"},
                                                       {"role": "user", "content": "Say something."}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_completions_endpoint_and_logit_bias(edge_mesh: EdgeMesh) -> None:
    client = _client(edge_mesh)
    reply = client.completions.create(model=edge_mesh.model, prompt="Once upon a time", max_tokens=5,
                                      temperature=0, logit_bias={"28": 100})  # token 28 forced every step
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=edge_mesh.model, prompt="Once upon a time", max_tokens=5, temperature=0, logit_bias={"28": 100},
        stream=True) if c.choices)
    assert streamed == reply.choices[0].text and len(set(streamed)) <= 2


@pytest.mark.parametrize(("args", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
     "response_format.json_schema.schema.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"n": 99}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type"),
])
def test_bad_structured_input_is_a_400_naming_the_field(edge_mesh: EdgeMesh, args: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(edge_mesh).chat.completions.create(**{"model": edge_mesh.model, "messages": ASK, **args})
    assert err.value.body["param"] == param, err.value.body


def test_sdk_exposes_structured_output_tools_and_n(edge_mesh: EdgeMesh) -> None:
    from moemesh.sdk import ChatModel

    with ChatModel(model_name=edge_mesh.model, endpoint=edge_mesh.status["gateway"], api_key=edge_mesh.api_key,
                   temperature=0, max_tokens=30) as model:
        reply = model.chat([{"role": "user", "content": [{"type": "text", "text": "A person?"}]}],
                           response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.content), SCHEMA)
        call = model.chat("Weather?", tools=[WEATHER], tool_choice={"type": "function",
                                                                    "function": {"name": "get_weather"}})
        assert call.tool_calls[0]["function"]["name"] == "get_weather"
        assert len(model.chat("Hi", n=2, max_tokens=2).choices) == 2
