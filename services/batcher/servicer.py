"""moemesh.v1.Batcher over gRPC: GenerateRequest -> Sequence, Event -> GenerateEvent; the engine loop does the rest.

Status mapping: queue full -> RESOURCE_EXHAUSTED with trailing metadata `retry-after-ms`; a request that can never
run (empty prompt, prompt beyond the context window, unknown model) -> INVALID_ARGUMENT; the deadline passing before
the first token -> DEADLINE_EXCEEDED; the router failing before the first token -> UNAVAILABLE. After the first
token, such endings arrive in-band as the final event's finish_reason (DEADLINE, ERROR). A client that cancels or
disconnects has its sequence cancelled at once and released in the router before the next step.
"""

from __future__ import annotations

import math
import time

import grpc
from opentelemetry import baggage, context as otel_context, trace

from moemesh.errors import ErrorStatus, ServiceError
from moemesh.serving.telemetry import REQUEST_ID_KEY
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2
from services.batcher import metrics
from services.batcher.engine_loop import EngineLoop
from services.batcher.sequence import Finish, Sequence
from services.batcher.step import Event, InvalidRequest, QueueFull

SERVICE_NAME = batcher_pb2.DESCRIPTOR.services_by_name["Batcher"].full_name
FINISH_TO_PROTO = {
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.DEADLINE: common_pb2.FINISH_REASON_DEADLINE,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def deadline_from(request: batcher_pb2.GenerateRequest, time_remaining: float | None, now: float) -> float | None:
    """The earlier of deadline_unix_ms and the gRPC deadline, on the monotonic clock (`now`)."""
    candidates = []
    if request.deadline_unix_ms:
        candidates.append(now + request.deadline_unix_ms / 1000 - time.time())
    if time_remaining is not None:
        candidates.append(now + time_remaining)
    return min(candidates) if candidates else None


def sequence_from_proto(request: batcher_pb2.GenerateRequest, deadline: float | None, served_model: str) -> Sequence:
    if not request.request_id:
        raise InvalidRequest("request_id must not be empty")
    if request.model and served_model and request.model != served_model:
        raise InvalidRequest(f"model {request.model!r} is not served here (the router serves {served_model!r})")
    if not math.isfinite(request.tenant_weight) or request.tenant_weight < 0:
        raise InvalidRequest(f"tenant_weight must be >= 0, got {request.tenant_weight!r}")
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(request.sampling)
    ctx = baggage.set_baggage(REQUEST_ID_KEY, request.request_id, context=otel_context.get_current())
    return Sequence(
        seq_id=request.request_id, prompt_ids=list(request.prompt_ids), max_tokens=sampling.max_tokens,
        tenant=request.tenant, priority=request.priority, weight=request.tenant_weight or 1.0, deadline=deadline,
        stop_ids=frozenset(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos, sampling=sampling, trace=ctx,
        cache_salt=request.cache_salt,
    )


def event_to_proto(event: Event, sampling: common_pb2.SamplingParams) -> batcher_pb2.GenerateEvent:
    out = batcher_pb2.GenerateEvent(
        token_ids=event.token_ids, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
        queue_seconds=event.queue_seconds, preemptions=event.preemptions, cached_tokens=event.cached_tokens,
    )
    if sampling.logprobs or sampling.top_logprobs:
        for token, lp in zip(event.token_ids, event.logprobs):
            out.logprobs.add(token_id=token, logprob=lp)
        for alternatives in event.top_logprobs:
            for token, lp in alternatives[: sampling.top_logprobs]:
                out.top_logprobs.add(token_id=token, logprob=lp)
    for logprob, top in event.prompt_logprobs:
        out.prompt_logprobs.add(logprob=logprob, top_logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp)
                                                                for t, lp in top])
    if event.finish is not None:
        out.finish_reason = FINISH_TO_PROTO[event.finish]
        out.engine_seconds = event.engine_seconds
    return out


class BatcherServicer(batcher_pb2_grpc.BatcherServicer):
    def __init__(self, loop: EngineLoop) -> None:
        self._loop = loop

    async def Generate(self, request: batcher_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        trace.get_current_span().set_attribute(REQUEST_ID_KEY, request.request_id)
        await self._loop.wait_ready()
        served = self._loop.limits.model if self._loop.limits else ""
        seq = sequence_from_proto(request, deadline_from(request, context.time_remaining(), self._loop.clock()), served)
        events = await self._submit(seq)
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finish is not None
                if finished and event.completion_tokens == 0:
                    _raise_if_failed_early(event)
                yield event_to_proto(event, seq.sampling)
        finally:
            if not finished:  # the client cancelled or went away (or the server is stopping)
                self._loop.cancel(seq.seq_id)

    async def _submit(self, seq: Sequence):
        try:
            return await self._loop.submit(seq)
        except QueueFull as exc:
            metrics.REJECTED.labels("queue_full").inc()
            raise ServiceError(str(exc), status=ErrorStatus.RESOURCE_EXHAUSTED,
                               retry_after_ms=math.ceil(exc.retry_after * 1000)) from None
        except InvalidRequest:
            metrics.REJECTED.labels("invalid").inc()
            raise

    async def Cancel(self, request: batcher_pb2.CancelRequest, context: grpc.aio.ServicerContext):
        return batcher_pb2.CancelResponse(found=self._loop.cancel(request.request_id))

    async def Stats(self, request: batcher_pb2.StatsRequest, context: grpc.aio.ServicerContext):
        policy, s = self._loop.policy, self._loop.scheduler
        out = batcher_pb2.BatcherStats(max_batch_size=policy.batch_limit, max_queue=policy.max_queue,
                                       router_busy_fraction=self._loop.busy.fraction())
        if s is not None:
            out.waiting, out.running, out.steps, out.preemptions = len(s.queue), len(s.running), s.steps, s.preemptions
            out.kv_blocks_free, out.kv_blocks_total, out.kv_blocks_cached = s.kv.free, s.kv.total, s.kv.cached
        return out


def _raise_if_failed_early(event: Event) -> None:
    """Endings before any token are errors of the call, not a completion."""
    if event.finish is Finish.DEADLINE:
        raise ServiceError(f"deadline passed after {event.queue_seconds:.3f} s in the queue",
                           status=ErrorStatus.DEADLINE_EXCEEDED)
    if event.finish is Finish.ERROR:
        raise ServiceError(event.detail or "the router failed", status=ErrorStatus.UNAVAILABLE)


def add_to_server(servicer: BatcherServicer, server: grpc.aio.Server) -> list[str]:
    batcher_pb2_grpc.add_BatcherServicer_to_server(servicer, server)
    return [SERVICE_NAME]
