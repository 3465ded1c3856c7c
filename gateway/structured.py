"""response_format, tools and tool_choice checked and turned into what the mesh runs (no grpc, no protobuf).

    response_format json_object            -> Guided(json_object)           (any JSON object)
    response_format json_schema            -> Guided(json_schema=<schema>)   (the schema, checked here first)
    tool_choice {"function": {"name": f}}  -> Guided(f's parameters): the answer IS the arguments object
    tool_choice "required"                 -> Guided(anyOf {"name": const f, "arguments": f's parameters})
    tool_choice "auto" (default with tools) -> free text; <tool_call> blocks are parsed out (gateway/tool_calls.py)
    tool_choice "none"                     -> the tools are not shown to the model

Schemas are checked with jsonschema (the meta-schema of their draft) so that a bad one is a 400 naming the field;
the router's grammar compiler (xgrammar) then enforces them token by token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import exceptions as schema_errors
from jsonschema import validators

from moemesh.runtime.types import Guided

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """How the answer relates to the tools: mode none/auto/required/named (name: the forced function)."""

    mode: str = "none"
    name: str = ""
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool objects, shown to the model (empty for mode none)

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def _integral(value: Any) -> Any:
    """google.protobuf.Struct carries every number as a double: 12.0 back to 12 (maxLength, minItems... must be
    integers for the grammar compiler)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def check_schema(field: str, schema: Any) -> dict[str, Any]:
    """The schema, or ValueError naming `field` (and the path inside the schema) when it is not a valid schema."""
    schema = _integral(schema)
    if not isinstance(schema, dict):
        raise ValueError(f"{field}: must be a JSON Schema object, got {json.dumps(schema)[:80]}")
    try:
        validators.validator_for(schema).check_schema(schema)
    except schema_errors.SchemaError as exc:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise ValueError(f"{field}{where}: invalid JSON Schema: {exc.message}") from None
    return schema


def response_guided(response_format: dict[str, Any] | None) -> Guided | None:
    """Guided decoding for a response_format (None: free text)."""
    if not response_format:
        return None
    kind = response_format.get("type", "")
    if kind in ("", "text"):
        return None
    if kind == "json_object":
        return Guided(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"response_format.type: {kind!r} is not one of ['json_object', 'json_schema', 'text']")
    spec = response_format.get("json_schema") or {}
    name = spec.get("name", "")
    if name and not _NAME.match(name):
        raise ValueError(f"response_format.json_schema.name: {name!r} must be 1-64 letters, digits, _ or -")
    if spec.get("schema") is None:
        raise ValueError("response_format.json_schema.schema: required for type json_schema")
    schema = check_schema("response_format.json_schema.schema", spec["schema"])
    return Guided(json_schema=json.dumps(schema))


def _tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema; ValueError naming tools[i] for a bad tool."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type: {tool.get('type')!r} is not 'function'")
        function = tool.get("function") or {}
        name = function.get("name", "")
        if not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name: {name!r} must be 1-64 letters, digits, _ or -")
        if name in out:
            raise ValueError(f"tools[{i}].function.name: {name!r} is declared twice")
        parameters = function.get("parameters")
        out[name] = ANY_OBJECT if parameters is None else check_schema(f"tools[{i}].function.parameters",
                                                                        parameters)
    return out


def _choice(tool_choice: Any, names: dict[str, Any]) -> tuple[str, str]:
    """(mode, forced name) of a tool_choice value."""
    if tool_choice is None:
        return ("auto" if names else "none"), ""
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice: {tool_choice!r} is not 'auto', 'none', 'required' or a function")
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice: 'required' but no tools are given")
        return tool_choice, ""
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice: must be a string or {"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise ValueError(f"tool_choice.function.name: {name!r} is not one of the tools "
                         f"({', '.join(sorted(names)) or 'none given'})")
    return "named", name


def tool_plan(tools: list[dict[str, Any]], tool_choice: Any) -> tuple[ToolPlan, Guided | None]:
    """The tools' plan and the grammar forcing a call (None unless required or named)."""
    schemas = _tools(tools)
    mode, name = _choice(tool_choice, schemas)
    plan = ToolPlan(mode, name, tuple(tools) if mode != "none" else ())
    if mode == "named":
        return plan, Guided(json_schema=json.dumps(schemas[name]))
    if mode == "required":
        calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": s},
                  "required": ["name", "arguments"], "additionalProperties": False} for n, s in schemas.items()]
        return plan, Guided(json_schema=json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls}))
    return plan, None
