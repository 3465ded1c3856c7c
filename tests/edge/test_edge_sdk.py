"""The ChatModel SDK over gRPC: through the TLS edge and straight to a gateway, sync and async, typed errors, and
defaults from a mesh's status file (the README example against the real mesh: test_edge_mesh.py)."""

from __future__ import annotations

import json
import os

import pytest

from edge_clients import ca_cert
from edge_fake_chat import GOOD_KEY, LIMITED_KEY, RETRY_AFTER_MS
from moemesh.sdk import (
    AuthenticationError, BadRequestError, ChatModel, RateLimitError, ServiceUnavailableError,
    StreamError,
)

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture
def model(edge, edge_home) -> ChatModel:
    with ChatModel(model_name="tiny", temperature=0.7, max_tokens=200, endpoint=edge.url, api_key=GOOD_KEY,
                   ca_cert=ca_cert(edge_home)) as m:
        yield m


def test_chat_and_stream_through_the_edge(model: ChatModel) -> None:
    reply = model.chat(CONVERSATION)
    assert reply.content == "echo: What is 2 + 2?" and reply.finish_reason == "stop" and reply.model == "tiny"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0
    assert "".join(model.stream("Hello there")) == "echo: Hello there"
    assert model.last_usage is not None and model.last_usage.completion_tokens == 3


async def test_async_twins(model: ChatModel) -> None:
    reply = await model.achat(CONVERSATION)
    assert reply.content == "echo: What is 2 + 2?"
    assert "".join([t async for t in model.astream("Hi")]) == "echo: Hi"
    await model.aclose()


def test_typed_errors(edge, edge_home, model: ChatModel) -> None:
    def make(key: str) -> ChatModel:
        return ChatModel(model_name="tiny", endpoint=f"{edge.url}/v1", api_key=key, ca_cert=ca_cert(edge_home))

    with pytest.raises(AuthenticationError):
        make("nope").chat("hi")
    with pytest.raises(RateLimitError) as limited:
        make(LIMITED_KEY).chat("hi")
    assert limited.value.retry_after == RETRY_AFTER_MS / 1000
    with pytest.raises(BadRequestError) as bad:
        model.chat("hi", temperature=-0.5)
    assert bad.value.field == "temperature" and bad.value.code == "INVALID_ARGUMENT"
    with pytest.raises(BadRequestError, match="model: 'other' is not served") as unknown:
        ChatModel(model_name="other", endpoint=edge.url, api_key=GOOD_KEY, ca_cert=ca_cert(edge_home)).chat("hi")
    assert unknown.value.field == "model"
    with pytest.raises(StreamError, match="engine failed") as broken:
        list(model.stream("fail midstream"))
    assert broken.value.code == "INTERNAL"


def test_plaintext_gateway_and_unreachable_endpoint(fake_gateway) -> None:
    direct = ChatModel(model_name="tiny", endpoint=fake_gateway.address, api_key=GOOD_KEY)
    assert direct.chat("direct").content == "echo: direct"
    with pytest.raises(ServiceUnavailableError):
        ChatModel(model_name="tiny", endpoint="127.0.0.1:1", api_key=GOOD_KEY, timeout=5).chat("hi")
    with pytest.raises(ValueError, match="endpoint: 'nowhere'"):
        ChatModel(model_name="tiny", endpoint="nowhere")


def test_defaults_come_from_the_status_file(edge, edge_home, tmp_path, monkeypatch) -> None:
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"gateway": "127.0.0.1:1", "edge_https": edge.url, "ca_cert": ca_cert(edge_home),
                                  "api_key": GOOD_KEY, "model": "tiny", "pid": os.getpid()}))
    for name in ("MOEMESH_ENDPOINT", "MOEMESH_API_KEY", "MOEMESH_CA_CERT"):
        monkeypatch.delenv(name, raising=False)
    model = ChatModel(status_path=status)
    assert model.endpoint.tls and model.chat("from status").content == "echo: from status"
    with pytest.raises(ValueError, match="model_name: required"):
        ChatModel(status_path=tmp_path / "absent.json")
