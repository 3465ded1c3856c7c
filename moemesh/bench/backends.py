"""Backends of the load loop: the gateway over gRPC (moemesh.v1.Chat) and an OpenAI-compatible HTTP endpoint (the
edge). Each sends streamed requests with usage, so token counts are the server's. grpc and openai are imported here,
never torch.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from moemesh.bench.load import Clock
from moemesh.bench.stats import RequestRecord
from moemesh.bench.workload import LoadSpec
from moemesh.certs.client_tls import ClientTls
from moemesh.sdk.client import build_request
from moemesh.v1 import chat_pb2, chat_pb2_grpc

MESSAGE_LIMIT = 64 * 1024 * 1024


class GrpcBackend:
    """StreamChatCompletion on a gateway's port: plaintext, or mTLS when the mesh speaks it (`tls`)."""

    def __init__(self, target: str, api_key: str | None, model: str | None, timeout_s: float,
                 tls: ClientTls | None = None) -> None:
        self.target, self.model, self.timeout_s = target, model, timeout_s
        self.tls = tls or ClientTls()
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._stub: chat_pb2_grpc.ChatStub | None = None
        self._channel: grpc.aio.Channel | None = None

    async def _ready(self) -> chat_pb2_grpc.ChatStub:
        # The aio channel is made here, inside the running loop: one made outside it fails (FACTS.md).
        if self._stub is None:
            options = (("grpc.max_receive_message_length", MESSAGE_LIMIT),)
            self._channel = self.tls.aio_channel(self.target, options)
            self._stub = chat_pb2_grpc.ChatStub(self._channel)
        if self.model is None:
            models = await self._stub.ListModels(chat_pb2.ListModelsRequest(), metadata=self._metadata, timeout=30)
            self.model = models.data[0].id
        return self._stub

    async def send(self, prompt: str, spec: LoadSpec, record: RequestRecord, clock: Clock) -> None:
        try:
            stub = await self._ready()
            request = build_request(prompt, model=self.model, stream_usage=True, max_tokens=spec.max_tokens,
                                    temperature=spec.temperature, ignore_eos=spec.ignore_eos or None)
            call = stub.StreamChatCompletion(request, metadata=self._metadata, timeout=self.timeout_s)
            async for chunk in call:
                if chunk.HasField("error"):
                    raise RuntimeError(f"{chunk.error.code}: {chunk.error.message}")
                if chunk.choices and chunk.choices[0].delta.content:
                    record.chunk_times.append(clock())
                if chunk.HasField("usage"):
                    record.output_tokens = chunk.usage.completion_tokens
                    record.prompt_tokens = chunk.usage.prompt_tokens
        except grpc.aio.AioRpcError as exc:
            raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
        if not record.output_tokens:
            record.output_tokens = len(record.chunk_times)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class OpenAIBackend:
    """POST /v1/chat/completions with stream=true on an OpenAI-compatible endpoint (the moemesh edge: https://...,
    trusting `ca` when given; ignore_eos goes as the extra body field vLLM also accepts)."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None, timeout_s: float,
                 ca: Path | None = None) -> None:
        import openai  # lazily: only HTTP runs pay for it

        base = base_url.rstrip("/")
        base = base if base.endswith("/v1") else f"{base}/v1"
        http = openai.DefaultAsyncHttpxClient(verify=str(ca)) if ca else None
        self._client = openai.AsyncOpenAI(base_url=base, api_key=api_key or "none", max_retries=0,
                                          timeout=timeout_s, http_client=http)
        self.model = model

    async def send(self, prompt: str, spec: LoadSpec, record: RequestRecord, clock: Clock) -> None:
        if self.model is None:
            self.model = (await self._client.models.list()).data[0].id
        extra = {"ignore_eos": True} if spec.ignore_eos else None
        stream = await self._client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=spec.max_tokens,
            temperature=spec.temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                record.chunk_times.append(clock())
            if chunk.usage:
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
        if not record.output_tokens:
            record.output_tokens = len(record.chunk_times)

    async def close(self) -> None:
        await self._client.close()
