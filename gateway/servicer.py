"""moemesh.v1.Chat over gRPC: protobuf <-> gateway dataclasses, auth metadata, response shapes (OpenAI's), and
in-band errors once a stream has started. The work is in completion.py."""

from __future__ import annotations

import logging
import secrets
import time

import grpc

from gateway.account import AccountRpcs, MeteringAccount
from gateway import chat_proto
from gateway.chat_request import ValidatedChat, validate
from gateway.choices import ToolShaper, gather_choices, run_choices
from gateway.closing import Closing
from gateway.completion import Completions, Delta
from gateway.completion_api import CompletionRpcs, unary_only
from gateway.events import Tenant
from gateway.models import ModelCatalog
from moemesh.serving.errors import status_for
from moemesh.serving.telemetry import request_scope
from moemesh.v1 import chat_pb2, chat_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
FINGERPRINT = "moemesh-v1"
_ERROR_TYPES = {grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
                grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
                grpc.StatusCode.UNAUTHENTICATED: "authentication_error"}


def new_request_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def api_key(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return ""


def _error_chunk(exc: Exception, request_id: str) -> chat_pb2.StreamError:
    code, details, _ = status_for(exc)
    log.warning("stream %s failed after its first chunk: %s %s", request_id, code.name, details)
    return chat_pb2.StreamError(message=details, code=code.name, type=_ERROR_TYPES.get(code, "server_error"))


class ChatServicer(AccountRpcs, CompletionRpcs, chat_pb2_grpc.ChatServicer):
    def __init__(self, completions: Completions, models: ModelCatalog, metering, *, auth: bool,
                 default_max_tokens: int, request_timeout: float, account: MeteringAccount | None = None,
                 closing: Closing | None = None, max_n: int = 8) -> None:
        self._completions, self._models, self._metering = completions, models, metering
        self._closing = closing or Closing()  # streams end in-band before a drain's grace is over
        self._account = account  # SubmitFeedback / GetUsage (gateway/account.py); None: not metered
        self._auth, self._default_max_tokens, self._timeout = auth, default_max_tokens, request_timeout
        self._max_n = max_n  # most choices one request may ask for (n)

    async def _tenant(self, context) -> Tenant:
        key = api_key(context)
        if self._auth and not key:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authorization: missing; send metadata 'authorization: Bearer <api key>'")
        return await self._metering.authenticate(key)

    async def _admit(self, request, context, convert=chat_proto.to_chat_request) -> tuple[ValidatedChat, Tenant, float]:
        tenant = await self._tenant(context)
        req = convert(request)
        defaults = await self._completions.defaults(self._models.resolve(req.model))
        chat = validate(req, self._models, default_max_tokens=self._default_max_tokens, max_n=self._max_n,
                        defaults=defaults)
        remaining = context.time_remaining()
        timeout = self._timeout if remaining is None else min(self._timeout, max(remaining, 0.001))
        return chat, tenant, timeout

    async def CreateChatCompletion(self, request, context):
        chat, tenant, timeout = await self._admit(request, context)
        request_id, created = new_request_id(), int(time.time())
        with request_scope(request_id):
            got = await gather_choices(self._completions, chat, tenant, request_id, timeout)
        choices = []
        for i in range(chat.n):
            content, calls, reason = ToolShaper(chat.tools).answer(got.texts[i], got.finishes[i])
            choice = chat_pb2.Choice(index=i, finish_reason=reason, message=chat_proto.assistant(content, calls))
            if chat.sampling.logprobs:
                choice.logprobs.CopyFrom(chat_proto.logprobs(got.tokens[i]))
            choices.append(choice)
        return chat_pb2.ChatCompletion(
            id=request_id, object="chat.completion", created=created, model=chat.model, choices=choices,
            usage=chat_proto.usage(got.finishes), system_fingerprint=FINGERPRINT,
            prompt_logprobs=chat_proto.prompt_logprobs(got.prompt) if chat.prompt_logprobs is not None else [],
        )

    async def StreamChatCompletion(self, request, context):
        chat, tenant, timeout = await self._admit(request, context)
        unary_only(chat)
        request_id, created = new_request_id(), int(time.time())

        def chunk(**fields) -> chat_pb2.ChatCompletionChunk:
            return chat_pb2.ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                                model=chat.model, **fields)

        started, shapers, finishes = set(), [ToolShaper(chat.tools) for _ in range(chat.n)], []
        with request_scope(request_id):
            try:
                async for i, item in self._closing.guard(run_choices(self._completions, chat, tenant, request_id,
                                                                     timeout)):
                    if i not in started:
                        started.add(i)
                        yield chunk(choices=[chat_pb2.ChunkChoice(index=i, delta=chat_proto.delta("", [], "assistant"))])
                    if isinstance(item, Delta):
                        content, tools = shapers[i].delta(item)
                        choice = chat_pb2.ChunkChoice(index=i, delta=chat_proto.delta(content, tools))
                        if item.tokens:
                            choice.logprobs.CopyFrom(chat_proto.logprobs(item.tokens))
                        if content or tools or item.tokens:
                            yield chunk(choices=[choice])
                        continue
                    finishes.append(item)
                    content, tools, reason = shapers[i].finish(item)
                    if content or tools:
                        yield chunk(choices=[chat_pb2.ChunkChoice(index=i, delta=chat_proto.delta(content, tools))])
                    yield chunk(choices=[chat_pb2.ChunkChoice(index=i, delta=chat_pb2.Delta(), finish_reason=reason)])
                if chat.include_usage:
                    yield chunk(usage=chat_proto.usage(finishes))
            except Exception as exc:
                if not started:
                    raise  # nothing sent yet: a real status
                yield chunk(error=_error_chunk(exc, request_id))

    async def ListModels(self, request, context):
        await self._tenant(context)  # nothing but health answers without a key
        cards = []
        for e in self._models.entries:
            defaults = await self._completions.defaults(e.id)
            cards.append(chat_pb2.ModelCard(id=e.id, object="model", created=e.created, owned_by="moemesh",
                                            sampling_defaults=chat_proto.defaults_proto(defaults),
                                            quantization=e.quantization, backend=e.backend))
        return chat_pb2.ListModelsResponse(object="list", data=cards)


def add_to_server(servicer: ChatServicer, server: grpc.aio.Server) -> list[str]:
    chat_pb2_grpc.add_ChatServicer_to_server(servicer, server)
    return [SERVICE_NAME]
