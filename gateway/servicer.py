"""moemesh.v1.Chat over gRPC: protobuf <-> gateway dataclasses, auth metadata, response shapes (OpenAI's), and
in-band errors once a stream has started. The work is in completion.py."""

from __future__ import annotations

import logging
import secrets
import time

import grpc

from gateway.account import AccountRpcs, MeteringAccount
from gateway.chat_request import ChatRequest, Message, ValidatedChat, validate
from gateway.closing import Closing
from gateway.completion import Completions, Delta, Finish
from gateway.events import Tenant, TokenInfo
from gateway.models import ModelCatalog
from moemesh.serving.errors import status_for
from moemesh.serving.telemetry import request_scope
from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2

log = logging.getLogger(__name__)
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
UNSUPPORTED = ("tools", "tool_choice", "response_format", "functions", "logit_bias", "function_call")
FINGERPRINT = "moemesh-v1"
_ERROR_TYPES = {grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
                grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
                grpc.StatusCode.UNAUTHENTICATED: "authentication_error"}


def new_request_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def to_chat_request(req: chat_pb2.ChatCompletionRequest) -> ChatRequest:
    return ChatRequest(
        model=req.model,
        messages=tuple(Message(m.role, m.content, _opt(m, "name")) for m in req.messages),
        max_tokens=_opt(req, "max_tokens"), max_completion_tokens=_opt(req, "max_completion_tokens"),
        temperature=_opt(req, "temperature"), top_p=_opt(req, "top_p"), seed=_opt(req, "seed"),
        stop=tuple(req.stop), presence_penalty=_opt(req, "presence_penalty"),
        frequency_penalty=_opt(req, "frequency_penalty"), top_k=_opt(req, "top_k"), logprobs=req.logprobs,
        top_logprobs=_opt(req, "top_logprobs"), n=_opt(req, "n"), user=req.user,
        include_usage=req.stream_options.include_usage, ignore_eos=req.ignore_eos,
        unsupported=tuple(name for name in UNSUPPORTED if req.HasField(name)),
    )


def api_key(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return ""


def _logprobs(tokens: tuple[TokenInfo, ...]) -> chat_pb2.ChoiceLogprobs:
    def one(t: TokenInfo) -> chat_pb2.ChoiceLogprob:
        return chat_pb2.ChoiceLogprob(token=t.text, logprob=t.logprob, bytes=list(t.bytes),
                                      top_logprobs=[one(a) for a in t.top])

    return chat_pb2.ChoiceLogprobs(content=[one(t) for t in tokens])


class ChatServicer(AccountRpcs, chat_pb2_grpc.ChatServicer):
    def __init__(self, completions: Completions, models: ModelCatalog, metering, *, auth: bool,
                 default_max_tokens: int, request_timeout: float, account: MeteringAccount | None = None,
                 closing: Closing | None = None) -> None:
        self._completions, self._models, self._metering = completions, models, metering
        self._closing = closing or Closing()  # streams end in-band before a drain's grace is over
        self._account = account  # SubmitFeedback / GetUsage (gateway/account.py); None: not metered
        self._auth, self._default_max_tokens, self._timeout = auth, default_max_tokens, request_timeout

    async def _tenant(self, context) -> Tenant:
        key = api_key(context)
        if self._auth and not key:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authorization: missing; send metadata 'authorization: Bearer <api key>'")
        return await self._metering.authenticate(key)

    async def _admit(self, request, context) -> tuple[ValidatedChat, Tenant, float]:
        tenant = await self._tenant(context)
        chat = validate(to_chat_request(request), self._models, default_max_tokens=self._default_max_tokens)
        remaining = context.time_remaining()
        timeout = self._timeout if remaining is None else min(self._timeout, max(remaining, 0.001))
        return chat, tenant, timeout

    async def CreateChatCompletion(self, request, context):
        chat, tenant, timeout = await self._admit(request, context)
        request_id, created = new_request_id(), int(time.time())
        texts, tokens, finish = [], [], None
        with request_scope(request_id):
            async for item in self._completions.run(chat, tenant, request_id, timeout):
                if isinstance(item, Delta):
                    texts.append(item.text)
                    tokens.extend(item.tokens)
                else:
                    finish = item
        choice = chat_pb2.Choice(index=0, finish_reason=finish.reason,
                                 message=common_pb2.ChatMessage(role="assistant", content="".join(texts)))
        if chat.sampling.logprobs:
            choice.logprobs.CopyFrom(_logprobs(tuple(tokens)))
        return chat_pb2.ChatCompletion(
            id=request_id, object="chat.completion", created=created, model=chat.model, choices=[choice],
            usage=_usage(finish), system_fingerprint=FINGERPRINT,
        )

    async def StreamChatCompletion(self, request, context):
        chat, tenant, timeout = await self._admit(request, context)
        request_id, created = new_request_id(), int(time.time())

        def chunk(**fields) -> chat_pb2.ChatCompletionChunk:
            return chat_pb2.ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                                model=chat.model, **fields)

        started = False
        with request_scope(request_id):
            try:
                async for item in self._closing.guard(self._completions.run(chat, tenant, request_id, timeout)):
                    if not started:
                        started = True
                        yield chunk(choices=[chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(role="assistant",
                                                                                                 content=""))])
                    if isinstance(item, Delta):
                        choice = chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(content=item.text))
                        if item.tokens:
                            choice.logprobs.CopyFrom(_logprobs(item.tokens))
                        yield chunk(choices=[choice])
                    else:
                        yield chunk(choices=[chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(),
                                                                  finish_reason=item.reason)])
                        if chat.include_usage:
                            yield chunk(usage=_usage(item))
            except Exception as exc:
                if not started:
                    raise  # nothing sent yet: a real status
                code, details, _ = status_for(exc)
                log.warning("stream %s failed after its first chunk: %s %s", request_id, code.name, details)
                yield chunk(error=chat_pb2.StreamError(message=details, code=code.name,
                                                       type=_ERROR_TYPES.get(code, "server_error")))

    async def ListModels(self, request, context):
        await self._tenant(context)  # nothing but health answers without a key
        return chat_pb2.ListModelsResponse(object="list", data=[
            chat_pb2.ModelCard(id=e.id, object="model", created=e.created, owned_by="moemesh")
            for e in self._models.entries
        ])


def _usage(finish: Finish) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
                          total_tokens=finish.prompt_tokens + finish.completion_tokens)


def add_to_server(servicer: ChatServicer, server: grpc.aio.Server) -> list[str]:
    chat_pb2_grpc.add_ChatServicer_to_server(servicer, server)
    return [SERVICE_NAME]
