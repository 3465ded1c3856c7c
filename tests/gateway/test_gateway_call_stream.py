"""tool_choice "required" streams its call (gateway/call_stream.py): fragments in OpenAI's shape whose arguments
concatenate to the raw arguments text, the same call the non-streamed answer returns, however the text is split."""

from __future__ import annotations

import pytest

from gateway.call_stream import CallStream, arguments_text
from gateway.choices import ToolShaper
from gateway.completion import Delta, Finish
from gateway.structured import tool_plan

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
TEXT = '{"name": "get_weather", "arguments": {"city": "Pa\\"ri}s", "days": [1, {"a": [2]}]}}'
ARGS = '{"city": "Pa\\"ri}s", "days": [1, {"a": [2]}]}'


@pytest.mark.parametrize("step", [1, 2, 5, len(TEXT)])
def test_fragments_reassemble_the_raw_arguments_however_split(step) -> None:
    stream, fragments = CallStream(), []
    for i in range(0, len(TEXT), step):
        fragments += stream.feed(TEXT[i:i + step])
    call_id, name, _ = fragments[0]
    assert call_id.startswith("call_") and name == "get_weather"
    assert all(f[0] is None and f[1] is None for f in fragments[1:])
    assert "".join(f[2] for f in fragments) == ARGS == stream.arguments()
    if step == 1:
        assert len(fragments) > 10  # streamed piece by piece, not at the end


def test_arguments_before_name_and_scalar_arguments() -> None:
    stream = CallStream()
    assert stream.feed('{"arguments": {"k": 1}, ') == []  # no name yet: nothing can be sent
    assert stream.feed('"name": "f"}')[0][1:] == ("f", '{"k": 1}')
    assert arguments_text('{"name": "f", "arguments" : 5 }') == "5"
    assert arguments_text('{"name": "f", "arguments": "x,}"}') == '"x,}"'
    assert arguments_text('{"name": "f"}') is None


def _shape(pieces: list[str], reason: str = "stop"):
    shaper = ToolShaper(tool_plan(TOOLS, "required")[0])
    fragments = [f for p in pieces for f in shaper.delta(Delta(p))[1]]
    content, tail, finish = shaper.finish(Finish(reason, 10, len(pieces)))
    return fragments + tail, content, finish, shaper.calls


def test_required_stream_and_answer_give_the_same_call() -> None:
    fragments, content, finish, calls = _shape([TEXT[i:i + 3] for i in range(0, len(TEXT), 3)])
    assert (content, finish) == ("", "tool_calls")
    assert fragments[0].id == calls[0].id and fragments[0].name == "get_weather"
    assert "".join(f.arguments for f in fragments) == calls[0].arguments == ARGS
    _, answered, _ = ToolShaper(tool_plan(TOOLS, "required")[0]).answer(TEXT, Finish("stop", 10, 5))
    assert [(c.name, c.arguments) for c in answered] == [("get_weather", ARGS)]


def test_a_call_cut_by_max_tokens_ends_with_length_and_no_content() -> None:
    fragments, content, finish, calls = _shape([TEXT[:30], TEXT[30:50]], reason="length")
    assert (content, finish, calls) == ("", "length", [])
    assert fragments[0].name == "get_weather"  # the partial call went out, as OpenAI streams it
