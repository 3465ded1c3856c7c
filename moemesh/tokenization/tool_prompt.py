"""Tools for chat templates that do not render them: the conversation rewritten in the Hermes/Qwen2.5 format.

When a model's template never mentions `tools` (the built-in SmolLM2's does not), the tokenizer service rewrites
the conversation before rendering it:

  * the system message (a new one first when there is none) gets this block appended:

        # Tools

        You may call one or more functions to assist with the user query.

        You are provided with function signatures within <tools></tools> XML tags:
        <tools>
        {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}   (one a line)
        </tools>

        For each function call, return a json object with function name and arguments within <tool_call></tool_call>
        XML tags:
        <tool_call>
        {"name": <function-name>, "arguments": <args-json-object>}
        </tool_call>

  * an assistant turn with tool_calls gets one such <tool_call> block per call appended to its content;
  * a `tool` turn becomes a user turn whose content is wrapped in <tool_response></tool_response>.

The gateway parses <tool_call> blocks out of free ("auto") answers in the same format (gateway/tool_calls.py).
"""

from __future__ import annotations

import json
from typing import Any

_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
           "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
           "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
           "<args-json-object>}\n</tool_call>")


def tools_block(tools: list[dict[str, Any]]) -> str:
    return _HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + _FOOTER


def call_block(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments)
    except (TypeError, ValueError):
        pass  # keep the text as sent
    return "<tool_call>\n" + json.dumps({"name": function.get("name", ""), "arguments": arguments},
                                        ensure_ascii=False) + "\n</tool_call>"


def with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation rewritten for a template without tool support (see the module doc)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            blocks = "\n".join(call_block(c) for c in m.pop("tool_calls"))
            m["content"] = f"{m.get('content') or ''}\n{blocks}".lstrip("\n")
        if m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
        m.pop("tool_call_id", None)
        out.append(m)
    if not tools:
        return out
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{tools_block(tools)}"}
    else:
        out.insert(0, {"role": "system", "content": tools_block(tools)})
    return out
