"""The official openai client (sync and async) against the real Envoy edge over TLS 1.3, in front of a fake Chat
gateway speaking the real contract (the full mesh: test_edge_mesh.py)."""

from __future__ import annotations

import json

import openai
import pytest

from edge_clients import async_openai_client, http_client, openai_client
from edge_fake_chat import GOOD_KEY, LIMITED_KEY, RETRY_AFTER_MS

USER = [{"role": "user", "content": "hello edge"}]


def test_chat_and_stream_complete_with_the_sync_client(edge, edge_home) -> None:
    client = openai_client(edge, edge_home)
    reply = client.chat.completions.create(model="tiny", messages=USER)
    assert reply.choices[0].message.content == "echo: hello edge"
    assert reply.choices[0].finish_reason == "stop" and reply.usage.total_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello edge"
    assert chunks[-1].usage.total_tokens == 6 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_chat_and_stream_complete_with_the_async_client(edge, edge_home) -> None:
    client = async_openai_client(edge, edge_home)
    reply = await client.chat.completions.create(model="tiny", messages=USER)
    assert reply.choices[0].message.content == "echo: hello edge"
    stream = await client.chat.completions.create(model="tiny", messages=USER, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "echo: hello edge"
    await client.close()


def test_models_list_needs_a_key(edge, edge_home) -> None:
    assert [m.id for m in openai_client(edge, edge_home).models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai_client(edge, edge_home, key="wrong").models.list()
    with http_client(edge_home) as client:
        anonymous = client.get(f"{edge.url}/v1/models")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "UNAUTHENTICATED"


def test_a_bad_key_is_an_authentication_error(edge, edge_home) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        openai_client(edge, edge_home, key="wrong").chat.completions.create(model="tiny", messages=USER)
    assert err.value.body == {"message": "authorization: unknown or revoked API key", "type": "authentication_error",
                              "param": None, "code": "UNAUTHENTICATED"}


@pytest.mark.parametrize("stream", [False, True])
def test_an_exhausted_quota_is_a_rate_limit_error_with_retry_after(edge, edge_home, stream: bool) -> None:
    client = openai_client(edge, edge_home, key=LIMITED_KEY)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="tiny", messages=USER, stream=stream)
    headers = err.value.response.headers
    assert headers["retry-after-ms"] == str(RETRY_AFTER_MS) and headers["retry-after"] == "2"
    assert err.value.body["type"] == "rate_limit_exceeded" and err.value.body["code"] == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(("args", "param", "fragment"), [
    ({"temperature": -1}, "temperature", "not in [0, 2]"),
    ({"model": "nope"}, "model", "is not served"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, "functions", "not supported"),
    ({"extra_body": {"tool_calls_please": True}}, "tool_calls_please", "unknown field"),
    ({"messages": [{"role": "user", "content": "x", "refusal": "no"}]}, "messages[0].refusal", "unknown field"),
    ({"extra_body": {"stream_options": {"include_usage": True, "chunk_size": 3}}}, "stream_options.chunk_size",
     "unknown field"),
    ({"extra_body": {"max_tokens": "many"}}, "max_tokens", "invalid value"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}, "messages[0].content",
     "must be a string"),
])
def test_a_bad_field_is_a_bad_request_naming_it(edge, edge_home, args: dict, param: str, fragment: str) -> None:
    request = {"model": "tiny", "messages": USER, **args}
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(edge, edge_home).chat.completions.create(**request)
    assert err.value.body["param"] == param and fragment in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["code"] == "INVALID_ARGUMENT"


def test_an_error_after_the_first_chunk_raises_in_the_client(edge, edge_home) -> None:
    received = []
    with pytest.raises(openai.APIError, match="engine failed"):
        for chunk in openai_client(edge, edge_home).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "fail midstream"}], stream=True):
            received.append(chunk)
    assert received, "the error came in-band, after chunks"


def _frames(body: str) -> list[str]:
    assert body.endswith("\n\n")
    return body[:-2].split("\n\n")


def test_streams_are_sse_frames_ending_with_done(edge, edge_home) -> None:
    body = {"model": "tiny", "messages": USER, "stream": True}
    with http_client(edge_home) as client:
        response = client.post(f"{edge.url}/v1/chat/completions", json=body,
                               headers={"authorization": f"Bearer {GOOD_KEY}"})
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    assert not [h for h in response.headers if h.startswith("grpc-")]
    frames = _frames(response.text)
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: {") for f in frames[:-1])
    assert json.loads(frames[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_stream_on_the_explicit_stream_path_and_errors_in_band(edge, edge_home) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "fail midstream"}]}
    with http_client(edge_home) as client:
        response = client.post(f"{edge.url}/v1/chat/completions:stream", json=body,
                               headers={"authorization": f"Bearer {GOOD_KEY}"})
    frames = _frames(response.text)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["error"] == {"message": "batcher: the engine failed while generating",
                                                 "type": "server_error", "code": "INTERNAL"}


@pytest.mark.parametrize(("method", "path", "body", "status", "fragment"), [
    ("POST", "/v1/chat/completions", b'{"model": "tiny",', 400, "not a valid JSON object"),
    ("POST", "/v1/chat/completions", b'[1, 2]', 400, "not a valid JSON object"),
    ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}', 400,
     "UTF-8"),
    ("GET", "/v1/nope", None, 404, "Could not resolve"),
    ("POST", "/v1/embeddings", b"{}", 404, "Could not resolve"),
    ("POST", "/v1/chat/completions", b'{"model": "' + b"x" * (9 << 20) + b'"}', 413, "Payload Too Large"),
])
def test_envoys_own_errors_have_openais_shape(edge, edge_home, method, path, body, status, fragment) -> None:
    with http_client(edge_home) as client:
        response = client.request(method, f"{edge.url}{path}", content=body,
                                  headers={"authorization": f"Bearer {GOOD_KEY}", "content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]


def test_grpc_headers_of_http_clients_are_ignored(edge, edge_home, fake_gateway) -> None:
    """A client's grpc-timeout would otherwise become the call's deadline (a 504 of its own making)."""
    with http_client(edge_home) as client:
        response = client.post(f"{edge.url}/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "sleep 0.2"}]}, headers={"authorization": f"Bearer {GOOD_KEY}",
                                                                 "grpc-timeout": "1n", "grpc-encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert "grpc-timeout" not in fake_gateway.chat.metadata[-1]


def test_the_authorization_header_reaches_the_gateway_and_no_key_is_refused(edge, edge_home, fake_gateway) -> None:
    with http_client(edge_home) as client:
        ok = client.post(f"{edge.url}/v1/chat/completions", json={"model": "tiny", "messages": USER},
                         headers={"authorization": f"Bearer {GOOD_KEY}"})
        refused = client.post(f"{edge.url}/v1/chat/completions", json={"model": "tiny", "messages": USER})
    assert ok.status_code == 200 and fake_gateway.chat.metadata[-2]["authorization"] == f"Bearer {GOOD_KEY}"
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("code", "status", "kind", "error"), [
    ("INVALID_ARGUMENT", 400, "invalid_request_error", openai.BadRequestError),
    ("UNAUTHENTICATED", 401, "authentication_error", openai.AuthenticationError),
    ("PERMISSION_DENIED", 403, "permission_error", openai.PermissionDeniedError),
    ("NOT_FOUND", 404, "not_found_error", openai.NotFoundError),
    ("RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded", openai.RateLimitError),
    ("UNAVAILABLE", 503, "server_error", openai.InternalServerError),
    ("DEADLINE_EXCEEDED", 504, "server_error", openai.InternalServerError),
])
@pytest.mark.parametrize("stream", [False, True])
def test_grpc_codes_map_to_http_statuses(edge, edge_home, code, status, kind, error, stream: bool) -> None:
    with pytest.raises(error) as err:
        openai_client(edge, edge_home, key=f"code-{code}").chat.completions.create(model="tiny", messages=USER,
                                                                                   stream=stream)
    assert err.value.status_code == status
    assert err.value.body == {"message": f"failing with {code} as asked", "type": kind, "param": None, "code": code}
