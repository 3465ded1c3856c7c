"""Issue 17's acceptance on the built-in model: through the real edge with the official openai client, a json_schema
response parses and validates on 100 of 100 sampled tries (the grammar makes it valid and closes it before
max_tokens). Slow: it starts `moemesh up --edge` on smollm2-moe."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import edge_harness

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.slow
def test_json_schema_validates_100_of_100_on_the_builtin_model(tmp_path) -> None:
    from moemesh.models.registry import resolve_model

    mesh = edge_harness.start(tmp_path / "home", resolve_model("smollm2-moe", progress=False), "--edge-rps", "5000")
    try:
        client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=mesh.api_key, max_retries=0, timeout=120,
                               http_client=openai.DefaultHttpxClient(verify=mesh.ca_cert))
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
        valid = 0
        for seed in range(100):
            reply = client.chat.completions.create(
                model=mesh.model, messages=[{"role": "user", "content": "Invent a person as JSON."}],
                max_tokens=24, temperature=1.0, seed=seed, response_format=fmt)
            text = reply.choices[0].message.content
            assert _valid(text), (seed, text, reply.choices[0].finish_reason, reply.usage)
            valid += 1
        assert valid == 100
    finally:
        edge_harness.stop(mesh.proc)
