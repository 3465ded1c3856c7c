"""The batcher's side of moemesh.v1.Router: step plans -> StepRequest, StepResponse -> outcomes, Release, Info.

Tracing: a step serves many requests, so its span "batcher.step" is a child of one of them (the first sequence that
starts in the step, else the first in the step) and links to the others; the Step call made under it carries that
trace to the router and the expert shards. A request's trace thus holds the steps it started in, and every step is
reachable from every request through the links.
Sampling: a decode step costs each hop a few spans (batcher.step, the Step call's client and server spans,
router.step, per shard expert.forward_step and expert.step), about 0.25 ms of CPU per token over the mesh on 2 cores.
So only some steps are traced: every step in which a sequence starts (each request's trace keeps its first step
through the router and the shards), every `trace_every`-th step, and the step after a failed one. The others run
under a non-sampled context: every span of theirs, here and downstream, is a cheap non-recording one, and the router
sends the shards no trace context (no expert.step spans). An untraced step goes out on a second channel without
the OTel client interceptor, carrying only a not-sampled traceparent that this client writes itself: the
interceptor's per-call work (an extra task, a non-recording span, context propagation) was about a tenth of the
batcher's CPU per token at batch 1 (benchmarks/results/mesh-profile-cpu-frontend.md), for spans nobody records.

Deadlines: a Step call's gRPC deadline is the latest deadline of its sequences (when all have one), so the router
sees how long the step is worth computing; per-sequence deadlines are enforced by the scheduler between steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from moemesh.serving.telemetry import client_channel, tracer
from moemesh.v1 import router_pb2, router_pb2_grpc
from services.batcher.step import RouterFull, RouterLimits, SequenceResult, SequenceWork, StepOutcome, StepPlan

_MAX_LINKS = 64
TRACE_EVERY = 16  # every 16th step is traced (besides the steps that start a sequence); 1: every step
_IDS = RandomIdGenerator()


class RouterClient:
    def __init__(self, address: str, step_timeout: float = 120.0, span_tracer: trace.Tracer | None = None,
                 trace_every: int = TRACE_EVERY) -> None:
        self.address = address
        self.step_timeout = step_timeout
        self.trace_every = trace_every
        self._trace_next = True  # trace the next step sent whatever it holds (the first; the one after a failure)
        self._channel = client_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._plain_channel = client_channel(address, traced=False)  # untraced steps (module doc, Sampling)
        self._plain_stub = router_pb2_grpc.RouterStub(self._plain_channel)
        self._tracer = span_tracer or tracer("moemesh.batcher")

    async def info(self, timeout: float = 10.0) -> RouterLimits:
        r = await self._stub.Info(router_pb2.RouterInfoRequest(), timeout=timeout)
        return RouterLimits(
            model=r.model, max_context=r.max_context, kv_block_size=r.kv_block_size,
            kv_blocks_total=r.kv_blocks_total, kv_blocks_free=r.kv_blocks_free,
            active_sequences=r.active_sequences, eos_token_ids=tuple(r.eos_token_ids),
            instance_id=r.instance_id,
        )

    async def release(self, seq_ids: Seq[str]) -> int:
        """Frees the sequences' KV cache; returns the router's free blocks afterwards."""
        r = await self._stub.Release(router_pb2.ReleaseRequest(seq_ids=list(seq_ids)), timeout=self.step_timeout)
        return r.kv_blocks_free

    async def step(self, plan: StepPlan) -> StepOutcome:
        """Runs the plan, its releases first (the router applies them even when it refuses the step). Raises
        RouterFull on RESOURCE_EXHAUSTED."""
        request = router_pb2.StepRequest(step_id=plan.step_id, work=[_work(i) for i in plan.items],
                                         release=plan.release)
        try:
            if self._sampled(plan):
                self._trace_next = False
                r = await self._traced_step(plan, request)
            else:
                r = await self._plain_stub.Step(request, timeout=self._timeout(plan), metadata=_unsampled_metadata())
        except grpc.aio.AioRpcError as exc:
            self._trace_next = True  # the step after a failed one is traced
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            raise RouterFull(exc.details() or "KV cache full", await self._free_blocks()) from exc
        return StepOutcome(outputs=[_result(o) for o in r.results], compute_seconds=r.compute_seconds,
                           kv_blocks_free=r.kv_blocks_free, kv_blocks_own=dict(r.kv_blocks_own),
                           kv_blocks_cached=r.kv_blocks_cached)

    async def _traced_step(self, plan: StepPlan, request: router_pb2.StepRequest) -> router_pb2.StepResponse:
        """The Step call under a "batcher.step" span (module doc, Tracing), on the traced channel."""
        parent, links = _trace_parent(plan)
        attributes = {"moemesh.step_id": plan.step_id, "moemesh.sequences": len(plan.items),
                      "moemesh.tokens": plan.tokens}
        with self._tracer.start_as_current_span("batcher.step", context=parent, links=links, attributes=attributes):
            return await self._stub.Step(request, timeout=self._timeout(plan))

    def _sampled(self, plan: StepPlan) -> bool:
        """Traced steps: see the module doc (Sampling)."""
        return (self._trace_next or self.trace_every <= 1 or plan.step_id % self.trace_every == 0
                or any(i.position == 0 and not i.follows for i in plan.items))

    def _timeout(self, plan: StepPlan) -> float:
        """The step's gRPC deadline: step_timeout, or sooner when every sequence in it has a deadline (the latest
        of them), so the router sees how long the step is worth computing."""
        deadlines = [i.seq.deadline for i in plan.items]
        if not deadlines or any(d is None for d in deadlines):
            return self.step_timeout
        return max(0.001, min(self.step_timeout, max(deadlines) - time.monotonic()))

    async def _free_blocks(self) -> int | None:
        try:
            return (await self.info()).kv_blocks_free
        except grpc.aio.AioRpcError:
            return None

    async def close(self) -> None:
        await self._channel.close()
        await self._plain_channel.close()


def _work(item: SequenceWork) -> router_pb2.SequenceWork:
    """Sampling parameters, tenant and cache salt travel once per sequence: with its first work (position 0, also
    when it restarts after a preemption); the router keeps them."""
    if item.follows:  # the router feeds its own last sampled token (the batcher may not know it yet)
        return router_pb2.SequenceWork(seq_id=item.seq.seq_id, position=item.position, sample=True, follows=True)
    work = router_pb2.SequenceWork(seq_id=item.seq.seq_id, token_ids=item.token_ids, position=item.position,
                                   sample=item.sample)
    if item.position == 0:
        seq = item.seq
        if seq.sampling is not None:
            work.sampling.CopyFrom(seq.sampling)
        work.tenant, work.cache_salt = seq.tenant, seq.cache_salt
    return work


def _result(o: router_pb2.SequenceResult) -> SequenceResult:
    return SequenceResult(
        seq_id=o.seq_id, token_id=o.token_id if o.HasField("token_id") else None, logprob=o.logprob,
        top_logprobs=[(t.token_id, t.logprob) for t in o.top_logprobs], cached_tokens=o.cached_tokens,
        prompt_logprobs=[(p.logprob if p.HasField("logprob") else None,
                          [(t.token_id, t.logprob) for t in p.top_logprobs]) for p in o.prompt_logprobs])


def _unsampled_metadata() -> tuple[tuple[str, str], ...]:
    """A W3C traceparent whose flags say "not sampled": the router's spans under it (and the shards', which it then
    sends no context) do not record. Its own trace id, so that nothing joins a request's trace, nor starts a trace of
    its own (a call without a traceparent would be a sampled root at the router)."""
    return (("traceparent", f"00-{_IDS.generate_trace_id():032x}-{_IDS.generate_span_id():016x}-00"),)


def _trace_parent(plan: StepPlan):
    """(parent context, links to the other requests' spans) of a step span."""
    ctxs = [i.seq.trace for i in plan.items if i.seq.trace is not None]
    fresh = [i.seq.trace for i in plan.items if i.seq.trace is not None and i.position == 0]
    parent = (fresh or ctxs or [None])[0]
    links = []
    for ctx in ctxs:
        if ctx is parent or len(links) >= _MAX_LINKS:
            continue
        span_ctx = trace.get_current_span(ctx).get_span_context()
        if span_ctx.is_valid:
            links.append(trace.Link(span_ctx))
    return parent, links
