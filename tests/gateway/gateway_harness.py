"""Stand-ins for the gateway tests (fixtures in conftest.py). The batcher and metering speak their real contracts
(the gateway is under test here; tests/e2e runs the real ones): the batcher streams a script of token ids, one per
event, then an EOS (or fails as a test asks); metering knows one API key and records every call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from moemesh.tokenization.chat_tokenizer import ChatTokenizer
from services.tokenizer.servicer import TokenizerServicer
from moemesh.v1 import (
    batcher_pb2, batcher_pb2_grpc, chat_pb2, chat_pb2_grpc, common_pb2, metering_pb2, metering_pb2_grpc,
)

MODEL = "tiny"
API_KEY = "mm-test-key"
EOS = 2  # <|im_end|> in SmolLM2's vocabulary


class StreamOnlyTokenizer(TokenizerServicer):
    """A tokenizer service from before Tokenizer.Definition (UNIMPLEMENTED): the gateway detokenizes over
    DetokenizeStream."""

    async def Definition(self, request, context):
        raise NotImplementedError("Definition: not in this version")


@dataclass
class ScriptedBatcher(batcher_pb2_grpc.BatcherServicer):
    """Generate streams `script` (token ids) one per event, `delay` apart, then EOS; `fail_after` raises an
    error after that many events; `refuse` fails the call before any event."""

    script: list[int] = field(default_factory=list)
    delay: float = 0.0
    fail_after: int | None = None
    refuse: Exception | None = None
    cached_tokens: int = 0  # prompt tokens every event reports as served from the prefix cache
    requests: list[batcher_pb2.GenerateRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    client_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    first_event_sent: asyncio.Event = field(default_factory=asyncio.Event)

    async def Generate(self, request, context):
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse
        prompt = len(request.prompt_ids)
        try:
            for i, token in enumerate([*self.script, EOS][: request.sampling.max_tokens]):
                if request.request_id in self.cancels:
                    yield batcher_pb2.GenerateEvent(finish_reason=common_pb2.FINISH_REASON_CANCELLED,
                                                    prompt_tokens=prompt, completion_tokens=i, engine_seconds=0.5)
                    return
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("engine exploded")
                await asyncio.sleep(self.delay)
                last = token == EOS or i + 1 == request.sampling.max_tokens
                reason = (common_pb2.FINISH_REASON_STOP if token == EOS else common_pb2.FINISH_REASON_LENGTH) if last else 0
                event = batcher_pb2.GenerateEvent(token_ids=[token], finish_reason=reason, prompt_tokens=prompt,
                                                  completion_tokens=i + 1, engine_seconds=0.25 if last else 0.0,
                                                  cached_tokens=min(self.cached_tokens, prompt))
                if i == 0 and request.sampling.HasField("prompt_logprobs"):
                    _score_prompt(event, request.prompt_ids, request.sampling.prompt_logprobs)
                if request.sampling.logprobs:
                    event.logprobs.add(token_id=token, logprob=-0.5)
                    for k in range(request.sampling.top_logprobs):
                        event.top_logprobs.add(token_id=token + k, logprob=-0.5 - k)
                yield event
                self.first_event_sent.set()
        except asyncio.CancelledError:
            self.client_cancelled.set()
            raise

    async def Cancel(self, request, context):
        self.cancels.append(request.request_id)
        return batcher_pb2.CancelResponse(found=True)


def _score_prompt(event: batcher_pb2.GenerateEvent, prompt_ids, alternatives: int) -> None:
    """What the router scores (prompt logprobs): prompt token k gets -k/10, alternatives token ids 0, 1, ..."""
    for k in range(len(prompt_ids)):
        entry = event.prompt_logprobs.add(logprob=None if k == 0 else -k / 10)
        if k:
            entry.top_logprobs.extend(common_pb2.TokenLogprob(token_id=a, logprob=-a - 0.5) for a in range(alternatives))


@dataclass
class RecordingMetering(metering_pb2_grpc.MeteringServicer):
    authenticated: int = 0
    reserves: list[metering_pb2.ReserveRequest] = field(default_factory=list)
    commits: list[metering_pb2.CommitRequest] = field(default_factory=list)
    committed: asyncio.Event = field(default_factory=asyncio.Event)

    async def Authenticate(self, request, context):
        self.authenticated += 1
        if request.api_key != API_KEY:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown key")
        return metering_pb2.AuthenticateResponse(tenant="acme", key_id="k1", weight=2.0, priority=1)

    async def Reserve(self, request, context):
        self.reserves.append(request)
        return metering_pb2.ReserveResponse(reservation_id=request.request_id, expires_in_s=60)

    async def Commit(self, request, context):
        self.commits.append(request)
        self.committed.set()
        return metering_pb2.CommitResponse()


@dataclass
class Mesh:
    chat: chat_pb2_grpc.ChatStub
    batcher: ScriptedBatcher
    metering: RecordingMetering
    tokenizer: ChatTokenizer

    def script(self, text: str, **kwargs) -> None:
        self.batcher.script = self.tokenizer.encode(text)
        for name, value in kwargs.items():
            setattr(self.batcher, name, value)


AUTH = (("authorization", f"Bearer {API_KEY}"),)


def request(**fields) -> chat_pb2.ChatCompletionRequest:
    fields.setdefault("model", MODEL)
    fields.setdefault("messages", [common_pb2.ChatMessage(role="user", content="Say hello")])
    return chat_pb2.ChatCompletionRequest(**fields)
