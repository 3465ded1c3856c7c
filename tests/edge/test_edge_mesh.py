"""The edge on the real mesh: `moemesh up --edge` (tiny MoE, eight processes), the official openai client over TLS
with the development CA, quotas from metering, and the README's SDK example as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from edge_harness import ROOT, EdgeMesh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ASK = [{"role": "user", "content": "Say something."}]


def _client(mesh: EdgeMesh, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=key or mesh.api_key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=mesh.ca_cert))


def test_status_file_names_the_edge_and_its_ca(edge_mesh: EdgeMesh) -> None:
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", edge_mesh.url)
    assert Path(edge_mesh.ca_cert) == edge_mesh.home / "certs" / "ca.pem" and Path(edge_mesh.ca_cert).is_file()
    assert "edge" in edge_mesh.status["services"]


def test_openai_sync_client_completes_with_and_without_stream(edge_mesh: EdgeMesh) -> None:
    client = _client(edge_mesh)
    reply = client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4
    assert reply.usage.prompt_tokens > 0 and reply.id.startswith("chatcmpl-")
    chunks = list(client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same answer both ways
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in client.models.list()] == [edge_mesh.status["model"]]


async def test_openai_async_client_completes_with_and_without_stream(edge_mesh: EdgeMesh) -> None:
    client = openai.AsyncOpenAI(base_url=f"{edge_mesh.url}/v1", api_key=edge_mesh.api_key, max_retries=0,
                                timeout=120, http_client=openai.DefaultAsyncHttpxClient(verify=edge_mesh.ca_cert))
    reply = await client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=3)
    assert reply.usage.completion_tokens <= 3
    stream = await client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=3, stream=True)
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] in ("stop", "length")
    await client.close()


def test_bad_key_and_bad_field_raise_the_openai_errors(edge_mesh: EdgeMesh) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(edge_mesh, key="mm-not-a-key").chat.completions.create(model=edge_mesh.model, messages=ASK)
    with pytest.raises(openai.BadRequestError) as err:
        _client(edge_mesh).chat.completions.create(model=edge_mesh.model, messages=ASK, presence_penalty=3)
    assert err.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as err:
        _client(edge_mesh).chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=10**6)
    assert err.value.body["param"] == "max_tokens" and "context window" in err.value.body["message"]


def test_an_exhausted_quota_is_a_rate_limit_error(edge_mesh: EdgeMesh) -> None:
    created = edge_mesh.cli("tenants", "create", "edge-rpm-1", "--rpm", "1", "--json")
    assert created.returncode == 0, created.stderr
    client = _client(edge_mesh, key=json.loads(created.stdout)["api_key"])
    client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=edge_mesh.model, messages=ASK, max_tokens=1)
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert err.value.body["code"] == "RESOURCE_EXHAUSTED" and "requests per minute" in err.value.body["message"]


def _readme_sdk_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python SDK\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_sdk_example_runs_as_written(edge_mesh: EdgeMesh) -> None:
    result = subprocess.run([sys.executable, "-c", _readme_sdk_example()], env=edge_mesh.env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    # The reply's text may span lines (sampled at temperature 0.7): the usage line is the one of three integers.
    usage = [line.split() for line in result.stdout.splitlines()
             if len(line.split()) == 3 and all(part.isdigit() for part in line.split())]
    assert usage, result.stdout
    prompt, completion, total = map(int, usage[0])
    assert prompt > 0 and completion > 0 and prompt + completion == total
