"""Oversized request headers at the edge get an answer, not an HTTP/2 stream reset: gRPC metadata over 60 KiB is
RESOURCE_EXHAUSTED naming the limit, HTTP headers over it 431; a connection-specific header (malformed HTTP/2, RFC
9113 8.2.2) is the one case where the codec resets the stream before any filter could answer (documented)."""

from __future__ import annotations

import grpc
import pytest

from edge_clients import ca_cert, http_client
from edge_fake_chat import GOOD_KEY
from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {GOOD_KEY}"),)
REQUEST = chat_pb2.ChatCompletionRequest(model="tiny", messages=[common_pb2.ChatMessage(role="user", content="hi")])


@pytest.fixture(scope="module")
def chat(edge, edge_home):
    creds = grpc.ssl_channel_credentials(open(ca_cert(edge_home), "rb").read())
    with grpc.secure_channel(f"127.0.0.1:{edge.port}", creds) as channel:
        yield chat_pb2_grpc.ChatStub(channel)


@pytest.mark.parametrize("headers, kib", [(1, 61), (1, 63), (3, 40), (10, 20)])
def test_huge_grpc_metadata_is_resource_exhausted(chat, headers: int, kib: int) -> None:
    pad = tuple((f"x-pad-{i}", "a" * (kib << 10)) for i in range(headers))
    for call in (chat.CreateChatCompletion, lambda *a, **k: list(chat.StreamChatCompletion(*a, **k))):
        with pytest.raises(grpc.RpcError) as err:
            call(REQUEST, metadata=AUTH + pad, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "60 KiB limit" in err.value.details()
    # under the limit it passes (4 KiB: the fake gateway keeps grpc's default 8 KiB; the real one takes 1 MiB)
    assert chat.CreateChatCompletion(REQUEST, metadata=AUTH + (("x-pad", "a" * (4 << 10)),), timeout=10).choices


def test_one_header_field_beyond_64_kib_is_still_a_reset(chat) -> None:
    """Envoy's HPACK decoder refuses a single header field over 64 KiB with a connection error (GOAWAY
    COMPRESSION_ERROR) before any filter runs: no gRPC status is possible there. Documented, not hidden."""
    with pytest.raises(grpc.RpcError) as err:
        chat.CreateChatCompletion(REQUEST, metadata=AUTH + (("x-pad", "a" * (65 << 10)),), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "GOAWAY" in err.value.details()
    assert chat.CreateChatCompletion(REQUEST, metadata=AUTH, timeout=10).choices  # the channel reconnects


def test_huge_http_headers_are_431(edge, edge_home) -> None:
    with http_client(edge_home) as http:
        response = http.post(f"https://127.0.0.1:{edge.port}/v1/chat/completions",
                             json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                             headers={"authorization": f"Bearer {GOOD_KEY}", "x-pad": "a" * (100 << 10)})
    assert response.status_code == 431 and "Too Large" in response.text
