"""Chat messages as clients send them -> the dicts the chat template renders (no grpc, no protobuf).

Accepted: roles system, developer (rendered as system), user, assistant, tool; `content` as a string or as an array
of text parts (joined with no separator, which is what the same text as one string gives); `name`; an assistant's
`tool_calls` (history of earlier calls) and a tool message's `tool_call_id`. A non-text part is refused naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None
    parts: tuple[tuple[str, str], ...] = ()  # (type, text) of content given as an array of parts
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI tool_calls entries (assistant history)
    tool_call_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _content(i: int, m: Message) -> str:
    if not m.parts:
        return m.content
    for j, (kind, _) in enumerate(m.parts):
        if kind != "text":
            raise ValueError(f"messages[{i}].content[{j}].type: {kind!r} parts are not supported; moemesh takes "
                             "text parts only")
    return "".join(text for _, text in m.parts)


def template_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    if not messages:
        raise ValueError("messages: at least one message is required")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"messages[{i}].role: {m.role!r} is not one of {sorted(ROLES)}")
        content = _content(i, m)
        if not content and not m.tool_calls:  # nothing to answer: OpenAI accepts it, but it only wastes a request
            raise ValueError(f"messages[{i}].content: must not be empty")
        if m.role == "tool" and not m.tool_call_id:
            raise ValueError(f"messages[{i}].tool_call_id: required for role 'tool'")
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise ValueError(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
            message["tool_calls"] = list(m.tool_calls)
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out
