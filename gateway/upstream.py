"""Adapters from the gateway's domain to the tokenizer and batcher services (protobuf <-> gateway.events)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from gateway.detokenizers import ChosenDetokenizer, LocalDecoders, check_ids
from gateway.events import GenerateParams, TokenEvent
from gateway.upstream_errors import in_chat_terms
from moemesh.errors import ErrorStatus, ServiceError
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger(__name__)
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_DEADLINE: "deadline",
    common_pb2.FINISH_REASON_ERROR: "error",
}
# After Batcher.Cancel, how long to wait for the stream's last event (it carries engine_seconds for the bill).
CANCEL_DRAIN_S = 2.0
# How long to wait for a finished stream's end-of-stream before abandoning it.
CLOSE_WAIT_S = 1.0
# Tokenizer calls: a stalled tokenizer (SIGSTOP, a hung process) must not hold a request forever. One attempt gets
# TOKENIZER_CALL_S; Encode, which admits nothing yet, is retried while the tokenizer restarts (supervision brings it
# back within seconds), for at most ENCODE_RETRY_S in all.
TOKENIZER_CALL_S = 15.0
ENCODE_RETRY_S = 30.0
# The gateway's channel to the batcher: small per-stream HTTP/2 windows (no BDP growth), so that a stream the gateway
# stops reading (its client does not read) stops the batcher's writes after ~4 KiB (~100 token events) and the
# batcher parks the sequence (services/batcher/backpressure.py). Measured: 117 events of 30 B per stalled stream;
# streams read normally are not slowed (flow-control updates are local round trips).
BATCHER_CHANNEL_OPTIONS = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096))


_CORE_RESETS = ("RST_STREAM", "Internal error from Core")


class PeerLost(ServiceError):
    """A peer service went away during a call: UNAVAILABLE with a message that says what to do."""

    status = ErrorStatus.UNAVAILABLE

    def __init__(self, peer: str, cause: object) -> None:
        super().__init__(f"{peer}: {cause}; a mesh service went away (it is restarted): retry the request in a "
                         "few seconds")


def _lost(peer: str, exc: BaseException) -> BaseException:
    """The error to raise for `exc` from a call to `peer`: PeerLost when the peer died, else `exc` unchanged."""
    if isinstance(exc, asyncio.InvalidStateError | ConnectionError):  # a write on a call the peer already ended
        return PeerLost(peer, "its stream broke")
    if not isinstance(exc, grpc.aio.AioRpcError):
        return exc
    details = exc.details() or exc.code().name
    # A peer that dies mid-stream resets it: UNAVAILABLE ("Socket closed"), or INTERNAL from gRPC core itself (naming
    # the RST_STREAM, or "Internal error from Core" when the call is cut while the channel is torn down: seen in CI on
    # a SIGKILLed tokenizer). A peer's own INTERNAL reads "internal error: ..." (moemesh.serving.errors).
    reset = exc.code() == grpc.StatusCode.INTERNAL and any(m in details for m in _CORE_RESETS)
    if exc.code() == grpc.StatusCode.UNAVAILABLE or reset:
        return PeerLost(peer, details)
    return exc


class TokenizerClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self._decoders = LocalDecoders(self._definition)  # streams detokenize here (gateway/detokenizers.py)

    async def encode_chat(self, model: str, messages: list[dict], tools_json: str = "") -> list[int]:
        chat = tokenizer_pb2.ChatInput(add_generation_prompt=True, tools_json=tools_json,
                                       messages=[_chat_message(m) for m in messages])
        response = await _retried(self._stub.Encode, tokenizer_pb2.EncodeRequest(model=model, chat=chat))
        return list(response.ids)

    async def encode_text(self, model: str, text: str) -> list[int]:
        response = await _retried(self._stub.Encode, tokenizer_pb2.EncodeRequest(model=model, text=text))
        return list(response.ids)

    async def sampling_defaults(self, model: str) -> dict[str, float]:
        """The model's generation_config.json sampling defaults (only those it sets)."""
        info = await _retried(self._stub.Info, tokenizer_pb2.TokenizerInfoRequest(model=model))
        d = info.generation_defaults
        return {f.name: value for f, value in d.ListFields()}

    async def eos_token_ids(self, model: str) -> tuple[int, ...]:
        info = await _retried(self._stub.Info, tokenizer_pb2.TokenizerInfoRequest(model=model))
        return tuple(info.eos_token_ids)

    async def pieces(self, model: str, ids: list[int]) -> list[tuple[str, bytes]]:
        local = self._decoders.known(model)
        if local is not None:  # the same ChatTokenizer.token_piece the service runs
            check_ids(ids, local.vocab_size)
            return [(p.text, p.bytes) for p in map(local.token_piece, ids)]
        response = await self._stub.Pieces(tokenizer_pb2.PiecesRequest(model=model, ids=ids))
        return [(p.text, p.bytes) for p in response.pieces]

    def detokenizer(self, model: str) -> ChosenDetokenizer:
        """In this process once the model's definition is here, else over DetokenizeStream."""
        return ChosenDetokenizer(self._decoders, model, lambda: StreamDetokenizer(self._stub, model))

    async def _definition(self, model: str) -> str | None:
        """The model's tokenizer.json (Tokenizer.Definition); None from a service without that RPC."""
        request = tokenizer_pb2.TokenizerDefinitionRequest(model=model)
        try:
            return (await self._stub.Definition(request, timeout=TOKENIZER_CALL_S)).tokenizer_json or None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise _lost("tokenizer", exc) from exc


async def _retried(method, request):
    """A unary tokenizer call, retried with backoff while the tokenizer is away or stalled (nothing is admitted
    before it answers, so a retry is safe); PeerLost once ENCODE_RETRY_S has passed."""
    give_up, delay = asyncio.get_running_loop().time() + ENCODE_RETRY_S, 0.1
    while True:
        try:
            return await method(request, timeout=TOKENIZER_CALL_S)
        except grpc.aio.AioRpcError as exc:
            lost = _lost("tokenizer", exc)
            stalled = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if not (isinstance(lost, PeerLost) or stalled) or asyncio.get_running_loop().time() + delay > give_up:
                raise (PeerLost("tokenizer", "no answer in time (stalled)") if stalled else lost) from exc
        log.info("tokenizer unavailable: retrying in %.1f s", delay)
        await asyncio.sleep(delay)
        delay = min(2 * delay, 2.0)


class StreamDetokenizer:
    """One DetokenizeStream call for one generated sequence: feed(ids) -> the text each id completed."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, model: str) -> None:
        self._stub, self._model = stub, model
        self._call = None

    async def feed(self, ids: list[int]) -> list[str]:
        if self._call is None:
            self._call = self._stub.DetokenizeStream()
            request = tokenizer_pb2.DetokenizeRequest(model=self._model, ids=ids, skip_special_tokens=True)
        else:
            request = tokenizer_pb2.DetokenizeRequest(ids=ids)
        try:
            async with asyncio.timeout(TOKENIZER_CALL_S):
                await self._call.write(request)
                response = await self._call.read()
        except TimeoutError as exc:
            raise PeerLost("tokenizer", f"no answer in {TOKENIZER_CALL_S:.0f} s (stalled)") from exc
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            raise _lost("tokenizer", exc) from exc
        if response is grpc.aio.EOF:
            raise PeerLost("tokenizer", "it closed the detokenize stream early")
        return list(response.token_texts)

    async def finish(self) -> None:
        """Ends the stream cleanly (so that its client span ends too): half-close, read to the end."""
        if self._call is None:
            return
        call, self._call = self._call, None
        try:
            await call.done_writing()
            async with asyncio.timeout(CLOSE_WAIT_S):
                while await call.read() is not grpc.aio.EOF:
                    pass
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
            log.debug("detokenize stream ended: %s", exc)
            end_call(call)

    def close(self) -> None:
        """Abandons the stream (cancel; its span is ended in the background)."""
        if self._call is not None:
            end_call(self._call)
            self._call = None


def _chat_message(m: dict) -> common_pb2.ChatMessage:
    out = common_pb2.ChatMessage(role=m["role"], content=m["content"], name=m.get("name"),
                                 tool_call_id=m.get("tool_call_id"))
    for c in m.get("tool_calls", ()):
        f = c.get("function", {})
        out.tool_calls.add(id=c.get("id", ""), type=c.get("type", "function"), function=common_pb2.FunctionCall(
            name=f.get("name", ""), arguments=f.get("arguments", "")))
    return out


def sampling_to_proto(s) -> common_pb2.SamplingParams:
    """runtime SamplingParams -> proto; stop strings stay in the gateway (it owns the text)."""
    out = common_pb2.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, max_tokens=s.max_tokens,
        logprobs=s.logprobs, top_logprobs=s.top_logprobs, ignore_eos=s.ignore_eos,
        stop_token_ids=s.stop_token_ids, logit_bias=[common_pb2.TokenBias(token_id=t, bias=b) for t, b in s.logit_bias],
        prompt_tokens=s.prompt_tokens, prompt_logprobs=s.prompt_logprobs,
    )
    if s.repetition_penalty != 1.0:
        out.repetition_penalty = s.repetition_penalty
    if s.guided is not None:
        out.guided.CopyFrom(common_pb2.GuidedDecoding(json_schema=s.guided.json_schema,
                                                      json_object=s.guided.json_object))
    return out


class BatcherClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = batcher_pb2_grpc.BatcherStub(channel)

    def generate(self, params: GenerateParams, timeout_s: float | None) -> Generation:
        sampling = sampling_to_proto(params.sampling)
        request = batcher_pb2.GenerateRequest(
            request_id=params.request_id, tenant=params.tenant, model=params.model, prompt_ids=params.prompt_ids,
            sampling=sampling, deadline_unix_ms=params.deadline_unix_ms, priority=params.priority,
            tenant_weight=params.tenant_weight, cache_salt=params.cache_salt,
        )
        return Generation(self._stub, self._stub.Generate(request, timeout=timeout_s), params.request_id)


class Generation:
    """A running Generate call: iterate for TokenEvents; stop_early() ends it and returns the last event if the
    batcher sends it in time."""

    def __init__(self, stub: batcher_pb2_grpc.BatcherStub, call, request_id: str) -> None:
        self._stub, self._call, self._request_id = stub, call, request_id

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Events until the one with finish_reason (the stream is then read to its end, which ends its span)."""
        try:
            async for event in self._call:
                token_event = _event(event)
                if token_event.finish_reason:
                    await self._read_to_end()
                    yield token_event
                    return
                yield token_event
        except grpc.aio.AioRpcError as exc:
            # Before the first event the batcher's own status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED...) stands.
            raise (in_chat_terms(exc) or _lost("batcher", exc)) from exc

    async def _read_to_end(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):
                async for _ in self._call:
                    pass
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            log.debug("generate stream of %s ended: %s", self._request_id, exc)

    async def stop_early(self) -> TokenEvent | None:
        """Batcher.Cancel, then read on until the final event (for engine_seconds), at most CANCEL_DRAIN_S."""
        last = None
        try:
            await self._stub.Cancel(batcher_pb2.CancelRequest(request_id=self._request_id), timeout=CANCEL_DRAIN_S)
            async with asyncio.timeout(CANCEL_DRAIN_S):
                async for event in self._call:
                    last = _event(event)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            log.debug("stopping %s early: %s", self._request_id, exc)
        finally:
            self.cancel()
        return last if last is not None and last.finish_reason else None

    def cancel(self) -> None:
        end_call(self._call)


_ending: set[asyncio.Task] = set()


def end_call(call) -> None:
    """Cancels a streaming call and, in the background, reads it once more: the OTel client interceptor ends a
    stream's span only when its response iterator finishes, so an abandoned stream would never export its span."""
    if call.done():
        return
    with contextlib.suppress(Exception):
        call.cancel()

    async def drain() -> None:
        with contextlib.suppress(BaseException):
            async for _ in call:
                pass

    task = asyncio.get_running_loop().create_task(drain())
    _ending.add(task)
    task.add_done_callback(_ending.discard)


def _event(event: batcher_pb2.GenerateEvent) -> TokenEvent:
    n = len(event.token_ids)
    per = len(event.top_logprobs) // n if n else 0
    top = tuple(
        tuple((t.token_id, t.logprob) for t in event.top_logprobs[i * per:(i + 1) * per]) for i in range(n)
    ) if per else ()
    return TokenEvent(
        token_ids=tuple(event.token_ids), logprobs=tuple(lp.logprob for lp in event.logprobs), top_logprobs=top,
        finish_reason=_FINISH.get(event.finish_reason), prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens, engine_seconds=event.engine_seconds,
        queue_seconds=event.queue_seconds, cached_tokens=event.cached_tokens,
        prompt_logprobs=tuple((p.logprob if p.HasField("logprob") else None,
                               tuple((t.token_id, t.logprob) for t in p.top_logprobs)) for p in event.prompt_logprobs),
    )
