"""Blocking gRPC client of moemesh.v1.Chat (auth metadata, message building, in-band stream errors)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from moemesh.certs.client_tls import ClientTls
from moemesh.serving import status as status_file
from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2

DEFAULT_ENDPOINT = "127.0.0.1:50051"
Messages = str | Sequence[dict[str, Any]]


class ChatStreamError(RuntimeError):
    """The gateway reported an error inside a stream that had already started."""

    def __init__(self, error: chat_pb2.StreamError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code, self.type, self.message = error.code, error.type, error.message


def _turn(m: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as the proto's JSON: content given as an array of parts goes to content_parts."""
    m = {k: v for k, v in m.items() if v is not None}
    if isinstance(m.get("content"), list):
        m["content_parts"] = m.pop("content")
    return m


def build_request(messages: Messages, *, model: str, system: str | None = None, stream_usage: bool = False,
                  **params: Any) -> chat_pb2.ChatCompletionRequest:
    """A ChatCompletionRequest from a user text (or a list of OpenAI messages) and OpenAI-named parameters in
    OpenAI's JSON shapes (tools, tool_choice, response_format, logit_bias, n, stop_token_ids...); parameters left
    None are not sent (the gateway's defaults, then the model's, apply)."""
    turns = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if system is not None:
        turns.insert(0, {"role": "system", "content": system})
    body = {"model": model, "messages": [_turn(m) for m in turns],
            **{k: v for k, v in params.items() if v is not None}}
    request = json_format.ParseDict(body, chat_pb2.ChatCompletionRequest())
    if stream_usage:
        request.stream_options.include_usage = True
    return request


class ChatClient:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, api_key: str | None = None, *, model: str | None = None,
                 timeout: float | None = 600.0, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None) -> None:
        self.endpoint, self.model, self.timeout = endpoint, model, timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        # mTLS when the mesh speaks it: explicit files, else MOEMESH_MTLS=1's dev certificate, else plaintext
        self._channel = ClientTls(ca, cert, key).channel(endpoint)
        self._stub = chat_pb2_grpc.ChatStub(self._channel)

    @classmethod
    def from_status(cls, path: Path | None = None, *, endpoint: str | None = None, api_key: str | None = None,
                    model: str | None = None, **kwargs: Any) -> ChatClient:
        """Explicit arguments win; the rest comes from the running mesh's status file (then the defaults)."""
        status = status_file.read(path) or {}
        return cls(endpoint or status.get("gateway") or DEFAULT_ENDPOINT, api_key or status.get("api_key"),
                   model=model or status.get("model"), **kwargs)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def models(self) -> list[str]:
        response = self._stub.ListModels(chat_pb2.ListModelsRequest(), metadata=self._metadata, timeout=30)
        return [m.id for m in response.data]

    def _model(self, model: str | None) -> str:
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        self.model = self.models()[0]
        return self.model

    def complete(self, messages: Messages, *, model: str | None = None, **params: Any) -> chat_pb2.ChatCompletion:
        request = build_request(messages, model=self._model(model), **params)
        return self._stub.CreateChatCompletion(request, metadata=self._metadata, timeout=self.timeout)

    def text_complete(self, prompt: str, *, model: str | None = None, **params: Any) -> chat_pb2.Completion:
        """/v1/completions over gRPC (CreateCompletion): text in, text out, with OpenAI-named parameters (max_tokens,
        temperature, logprobs, echo, prompt_logprobs, stop, n, ...); None values are not sent."""
        body = {"model": self._model(model), "prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        request = json_format.ParseDict(body, chat_pb2.CompletionRequest())
        return self._stub.CreateCompletion(request, metadata=self._metadata, timeout=self.timeout)

    def stream(self, messages: Messages, *, model: str | None = None,
               **params: Any) -> Iterator[chat_pb2.ChatCompletionChunk]:
        """Chunks as they arrive; raises ChatStreamError for an in-band error chunk."""
        request = build_request(messages, model=self._model(model), **params)
        call = self._stub.StreamChatCompletion(request, metadata=self._metadata, timeout=self.timeout)
        try:
            for chunk in call:
                if chunk.HasField("error"):
                    raise ChatStreamError(chunk.error)
                yield chunk
        finally:
            call.cancel()  # no-op once finished; stops generation when the caller stops early

    def stream_text(self, messages: Messages, **params: Any) -> Iterator[str]:
        for chunk in self.stream(messages, **params):
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content
