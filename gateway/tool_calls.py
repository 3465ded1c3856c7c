"""Tool calls read out of an answer's text, in OpenAI's shape (no grpc, no protobuf).

named mode: the text is the arguments object (grammar-constrained); required: {"name": ..., "arguments": {...}};
auto: free text in which <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks are calls (the format the
tokenizer's tool prompt asks for, moemesh/tokenization/tool_prompt.py) and the rest is content.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from gateway.structured import ToolPlan

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # JSON text


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _call(obj: object, name: str | None = None, text: str = "") -> Call | None:
    if name is not None:  # the arguments as generated (a stream sends the same text piece by piece)
        return Call(call_id(), name, text)
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        arguments = obj.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return Call(call_id(), obj["name"], text)
    return None


def parse(text: str, plan: ToolPlan) -> tuple[str, list[Call]]:
    """(remaining content, calls) of an answer."""
    if plan.mode in ("named", "required"):
        try:
            obj = json.loads(text)
        except ValueError:
            return text, []  # cut by max_tokens before the JSON closed: returned as content
        call = _call(obj, plan.name, text) if plan.mode == "named" else _call(obj)
        return ("", [call]) if call else (text, [])
    if plan.mode != "auto" or "<tool_call>" not in text:
        return text, []
    calls = []
    for block in _BLOCK.findall(text):
        try:
            call = _call(json.loads(block))
        except ValueError:
            call = None
        if call is not None:
            calls.append(call)
    return (_BLOCK.sub("", text).strip() if calls else text), calls
