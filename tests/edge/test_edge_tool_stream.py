"""tool_choice "required" streamed through the real edge with the official openai client on the tiny MoE mesh: the
call arrives in several argument fragments (not whole at the end) that reassemble into the non-streamed call."""

from __future__ import annotations

import json

import openai

from edge_harness import EdgeMesh

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
    "additionalProperties": False}}}


def test_required_tool_call_streams_argument_deltas_that_reassemble(edge_mesh: EdgeMesh) -> None:
    client = openai.OpenAI(base_url=f"{edge_mesh.url}/v1", api_key=edge_mesh.api_key, max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(verify=edge_mesh.ca_cert))
    args = dict(model=edge_mesh.model, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=40,
                temperature=0, tools=[WEATHER], tool_choice="required")
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "tool_calls"
    call = whole.message.tool_calls[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    fragments = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert fragments[0].id and fragments[0].type == "function" and fragments[0].function.name == "get_weather"
    assert len([f for f in fragments if f.function.arguments]) > 2  # streamed piece by piece
    assert "".join(f.function.arguments or "" for f in fragments) == call.function.arguments  # greedy: same call
    json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
