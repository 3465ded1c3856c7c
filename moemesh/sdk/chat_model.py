"""`ChatModel`: the chat interface of the low-cost-LLM guides, over moemesh's gRPC API.

    from moemesh.sdk import ChatModel

    model = ChatModel(model_name="smollm2-moe", temperature=0.7, max_tokens=200,
                      endpoint="https://127.0.0.1:8443", api_key="mm-...")
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}])
    print(reply.content, reply.usage.total_tokens)
    for text in model.stream("Tell me a story"):          # a str is one user message
        print(text, end="", flush=True)
    reply = await model.achat(conversation)                # async twins: achat, astream

Endpoint: "https://host:port" is the Envoy edge (TLS, verified against `ca_cert`, else MOEMESH_CA_CERT, else the
running mesh's development CA, else the system's roots); "host:port" or "http://host:port" a gateway in plaintext.
Unset arguments come from MOEMESH_ENDPOINT / MOEMESH_API_KEY, then from the running `moemesh up` (its status file:
the edge when it runs one, else the gateway; its dev key and model). Failures raise moemesh.sdk.errors types.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from moemesh.certs.client_tls import ClientTls
from moemesh.sdk.client import Messages, build_request
from moemesh.sdk.errors import MoemeshError, from_rpc_error, from_stream_error
from moemesh.serving import status as status_file
from moemesh.v1 import chat_pb2, chat_pb2_grpc

DEFAULT_ENDPOINT = "127.0.0.1:50051"
MESSAGE_LIMIT = 64 * 1024 * 1024
_OPTIONS = (("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class ChatReply:
    """One answer: its text, token counts, why it stopped, and the request id (also the usage record's key)."""

    content: str
    usage: Usage
    finish_reason: str
    model: str
    id: str
    tool_calls: tuple[dict, ...] = ()  # OpenAI-shaped {"id", "type", "function": {"name", "arguments"}}
    choices: tuple[str, ...] = ()  # every choice's text when n > 1 (content is choices[0])
    # with prompt_logprobs=N: (token text, log-probability or None for the first token) per prompt token
    prompt_logprobs: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    target: str  # host:port
    tls: bool
    ca_cert: str | None = None

    @classmethod
    def parse(cls, endpoint: str, ca_cert: str | None) -> Endpoint:
        value = endpoint.strip()
        tls = value.startswith("https://")
        for prefix in ("https://", "http://", "grpc://", "dns:///"):
            if value.startswith(prefix):
                value = value[len(prefix):]
        value = value.split("/", 1)[0]  # an OpenAI base URL (".../v1") names the same host
        if not value or ":" not in value:
            raise ValueError(f"endpoint: {endpoint!r} is not host:port or https://host:port")
        return cls(value, tls, ca_cert)

    def credentials(self) -> grpc.ChannelCredentials:
        roots = Path(self.ca_cert).read_bytes() if self.ca_cert else None
        return grpc.ssl_channel_credentials(root_certificates=roots)


def _usage(u: chat_pb2.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


class ChatModel:
    def __init__(self, model_name: str | None = None, temperature: float | None = 0.7, max_tokens: int | None = 200,
                 endpoint: str | None = None, api_key: str | None = None, *, ca_cert: str | None = None,
                 timeout: float | None = 300.0, status_path: Path | None = None, **params: Any) -> None:
        status = status_file.read(status_path) or {}
        endpoint = endpoint or os.environ.get("MOEMESH_ENDPOINT") or status.get("edge_https") \
            or status.get("gateway") or DEFAULT_ENDPOINT
        ca_cert = ca_cert or os.environ.get("MOEMESH_CA_CERT") or status.get("ca_cert")
        self.endpoint = Endpoint.parse(endpoint, ca_cert)
        self.model_name = model_name or status.get("model")
        if not self.model_name:
            raise ValueError("model_name: required (no running `moemesh up` to take it from)")
        key = api_key or os.environ.get("MOEMESH_API_KEY") or status.get("api_key")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout = timeout
        self.params = {"temperature": temperature, "max_tokens": max_tokens, **params}
        self.last_usage: Usage | None = None  # of the last stream that finished
        self._sync: grpc.Channel | None = None
        self._aio: tuple[asyncio.AbstractEventLoop, grpc.aio.Channel] | None = None

    # -- channels -------------------------------------------------------------------------------------------------
    def _stub(self) -> chat_pb2_grpc.ChatStub:
        if self._sync is None:
            e = self.endpoint
            self._sync = (grpc.secure_channel(e.target, e.credentials(), options=_OPTIONS) if e.tls
                          else ClientTls().channel(e.target, _OPTIONS))  # mTLS with MOEMESH_MTLS=1
        return chat_pb2_grpc.ChatStub(self._sync)

    def _astub(self) -> chat_pb2_grpc.ChatStub:
        """A stub on an aio channel of the running loop (an aio channel is bound to the loop it was made in)."""
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            e = self.endpoint
            channel = (grpc.aio.secure_channel(e.target, e.credentials(), options=_OPTIONS) if e.tls
                       else ClientTls().aio_channel(e.target, _OPTIONS))
            self._aio = (loop, channel)
        return chat_pb2_grpc.ChatStub(self._aio[1])

    def _request(self, conversation: Messages, *, stream: bool, overrides: dict) -> chat_pb2.ChatCompletionRequest:
        return build_request(conversation, model=self.model_name, stream_usage=stream,
                             **{**self.params, **overrides})

    # -- sync -----------------------------------------------------------------------------------------------------
    def chat(self, conversation: Messages, **overrides: Any) -> ChatReply:
        """The whole answer to `conversation` (a user text, or a list of {"role", "content"})."""
        request = self._request(conversation, stream=False, overrides=overrides)
        try:
            response = self._stub().CreateChatCompletion(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return self._reply(response)

    def stream(self, conversation: Messages, **overrides: Any) -> Iterator[str]:
        """Text deltas as they are generated; `last_usage` is set when the stream ends."""
        request = self._request(conversation, stream=True, overrides=overrides)
        call = self._stub().StreamChatCompletion(request, metadata=self._metadata, timeout=self.timeout)
        try:
            for chunk in call:
                yield from self._texts(chunk)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once finished; stops the generation when the caller stops early

    # -- async ----------------------------------------------------------------------------------------------------
    async def achat(self, conversation: Messages, **overrides: Any) -> ChatReply:
        request = self._request(conversation, stream=False, overrides=overrides)
        try:
            response = await self._astub().CreateChatCompletion(request, metadata=self._metadata,
                                                                timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return self._reply(response)

    async def astream(self, conversation: Messages, **overrides: Any) -> AsyncIterator[str]:
        request = self._request(conversation, stream=True, overrides=overrides)
        call = self._astub().StreamChatCompletion(request, metadata=self._metadata, timeout=self.timeout)
        try:
            async for chunk in call:
                for text in self._texts(chunk):
                    yield text
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    # -- shared ---------------------------------------------------------------------------------------------------
    def _texts(self, chunk: chat_pb2.ChatCompletionChunk) -> list[str]:
        if chunk.HasField("error"):
            raise from_stream_error(chunk.error.code, chunk.error.message, chunk.error.type)
        if chunk.HasField("usage"):
            self.last_usage = _usage(chunk.usage)
        return [c.delta.content for c in chunk.choices if c.delta.content]

    @staticmethod
    def _reply(response: chat_pb2.ChatCompletion) -> ChatReply:
        if not response.choices:
            raise MoemeshError("the server sent an answer without choices", code="INTERNAL")
        choice = response.choices[0]
        calls = tuple({"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                                 "arguments": c.function.arguments}}
                      for c in choice.message.tool_calls)
        prompt = tuple((p.token, p.logprob if p.HasField("logprob") else None) for p in response.prompt_logprobs)
        return ChatReply(choice.message.content, _usage(response.usage), choice.finish_reason, response.model,
                         response.id, calls, tuple(c.message.content for c in response.choices), prompt)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio[1].close()
            self._aio = None

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ChatModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        self.close()
