"""A small moemesh.v1.Chat server speaking the real contract, for testing the edge without the mesh.

It runs in its own threads (grpc's sync server), so blocking clients (the sync openai client) can call Envoy while
it answers. Requests are validated by the gateway's own code (gateway.chat_request.validate); answers echo the last
message. Keys: "good-key" (tenant acme), "limited-key" (always RESOURCE_EXHAUSTED with retry-after-ms 1500),
"code-<NAME>" (always that gRPC status).
Prompts steer failures: "fail midstream" streams one delta then an in-band error (like the gateway), "sleep <s>"
answers after that many seconds, "drip <n> <s>" streams n words `s` seconds apart.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.chat_request import validate
from gateway.models import ModelCatalog
from gateway.chat_proto import to_chat_request
from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2

MODEL = "tiny"
GOOD_KEY, LIMITED_KEY = "good-key", "limited-key"
RETRY_AFTER_MS = 1500


def _key(context) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization" and isinstance(v, str) and v.lower().startswith("bearer "):
            return v[7:].strip()
    return ""


class FakeChat(chat_pb2_grpc.ChatServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []  # invocation metadata of every call, for assertions

    def _admit(self, request, context):
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        key = _key(context)
        if key.startswith("code-"):  # "code-PERMISSION_DENIED": fail with that status
            context.abort(grpc.StatusCode[key[5:]], f"failing with {key[5:]} as asked")
        if key == LIMITED_KEY:
            context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"tenant 'limited': requests per minute limit 1 reached; retry after {RETRY_AFTER_MS} ms")
        if key != GOOD_KEY:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown or revoked API key")
        try:
            return validate(to_chat_request(request), ModelCatalog([MODEL]), default_max_tokens=16)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    @staticmethod
    def _answer(chat) -> str:
        last = chat.messages[-1]["content"]
        if last.startswith("sleep "):
            time.sleep(float(last.split()[1]))
        return "echo: " + last[:200]

    def CreateChatCompletion(self, request, context):
        chat = self._admit(request, context)
        text = self._answer(chat)
        return chat_pb2.ChatCompletion(
            id="chatcmpl-fake", object="chat.completion", created=int(time.time()), model=chat.model,
            choices=[chat_pb2.Choice(index=0, finish_reason="stop",
                                     message=common_pb2.ChatMessage(role="assistant", content=text))],
            usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=len(text.split()),
                                 total_tokens=3 + len(text.split())))

    def StreamChatCompletion(self, request, context):
        chat = self._admit(request, context)
        text = self._answer(chat)

        def chunk(**fields):
            return chat_pb2.ChatCompletionChunk(id="chatcmpl-fake", object="chat.completion.chunk",
                                                created=int(time.time()), model=chat.model, **fields)

        yield chunk(choices=[chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(role="assistant", content=""))])
        words = text.split(" ")
        last = chat.messages[-1]["content"]
        gap = float(last.split()[2]) if last.startswith("drip ") else 0.0
        if gap:
            words = ["w"] * int(last.split()[1])
        for i, word in enumerate(words):
            time.sleep(gap)
            piece = word if i == 0 else " " + word
            yield chunk(choices=[chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(content=piece))])
            if "fail midstream" in text and i == 0:
                yield chunk(error=chat_pb2.StreamError(message="batcher: the engine failed while generating",
                                                       type="server_error", code="INTERNAL"))
                return
        yield chunk(choices=[chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(), finish_reason="stop")])
        if chat.include_usage:
            yield chunk(usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=len(words),
                                             total_tokens=3 + len(words)))

    def ListModels(self, request, context):
        _key(context) == GOOD_KEY or context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing")
        return chat_pb2.ListModelsResponse(object="list", data=[
            chat_pb2.ModelCard(id=MODEL, object="model", created=1, owned_by="moemesh")])


class FakeGateway:
    """The fake Chat service plus grpc.health on 127.0.0.1:<free port> (or with server credentials: mTLS)."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.chat = FakeChat()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        chat_pb2_grpc.add_ChatServicer_to_server(self.chat, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health.set("moemesh.v1.Chat", health_pb2.HealthCheckResponse.SERVING)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("moemesh.v1.Chat", status)

    def stop(self) -> None:
        self.server.stop(0)
