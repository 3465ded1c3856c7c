"""Tracing and accounting of one router step's expert traffic (the router's span policy lives here).

Policy: a step makes one span "router.step", and for each shard it called, one CLIENT span "expert.forward_step"
covering that shard's per-layer calls of the step, with the calls aggregated as attributes (moemesh.expert.calls,
.layers, .tokens, .bytes_sent, .bytes_received, .seconds, .compute_seconds). The per-layer Forward calls travel on a
channel without the OTel client interceptor; the W3C context of the shard's step span is injected by hand into their
metadata, so the expert's aggregated server span ("expert.step", see services/expert/step_spans.py) joins the trace.
With MOEMESH_TRACE_LAYERS=1 every call also gets its own child span "expert.forward" (and the header
`moemesh-trace-layers: 1` asks the expert for a per-call server span): thousands of spans per request, debugging only.
A step the batcher did not sample (services/batcher/router_client.py, Sampling: its Step call arrives with a
non-sampled traceparent) makes no span here and sends the shards no trace context: only the per-shard counts that the
metrics need are kept.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

TRACE_LAYERS_ENV = "MOEMESH_TRACE_LAYERS"
TRACE_LAYERS_HEADER = "moemesh-trace-layers"
STEP_ID_HEADER = "moemesh-step-id"

_CURRENT: ContextVar[StepTrace | None] = ContextVar("moemesh_router_step", default=None)


def trace_layers_enabled() -> bool:
    return os.environ.get(TRACE_LAYERS_ENV, "").strip().lower() in ("1", "true", "yes")


def current_step() -> StepTrace | None:
    """The step being computed on this thread's context (None outside router.step, e.g. in unit tests)."""
    return _CURRENT.get()


@dataclass
class ShardStepStats:
    """One shard's share of one step."""

    address: str
    span: trace.Span | None  # None: the step is not traced
    calls: int = 0
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0  # sum of per-call wall times (calls of one layer overlap across shards, not within one)
    compute_seconds: float = 0.0  # sum of the shard-reported compute times
    layers: set[int] = field(default_factory=set)
    call_seconds: list[float] = field(default_factory=list)  # per call, for the latency histogram
    end_ns: int = 0


class StepTrace:
    """Collects one step's per-shard stats; ends the shard spans (with the aggregates) when the step ends."""

    def __init__(self, step_id: int, tracer: trace.Tracer, per_layer: bool = False, traced: bool = True) -> None:
        self.step_id = step_id
        self.traced = traced
        self.per_layer = per_layer and traced
        self._tracer = tracer
        self._parent = otel_context.get_current()  # the router.step span's context
        self.shards: dict[int, ShardStepStats] = {}
        self._layer_spans: dict[tuple[int, int], trace.Span] = {}

    def _shard(self, index: int, address: str) -> ShardStepStats:
        stats = self.shards.get(index)
        if stats is None:
            span = None if not self.traced else self._tracer.start_span(
                "expert.forward_step", context=self._parent, kind=trace.SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": "moemesh.v1.Expert", "rpc.method": "Forward",
                            "server.address": address, "moemesh.step_id": self.step_id, "moemesh.shard": index},
            )
            stats = self.shards[index] = ShardStepStats(address=address, span=span)
        return stats

    def headers(self, index: int, address: str, layer: int) -> dict[str, str]:
        """Metadata for one per-layer call: W3C context of the shard's step span (or of a per-layer span) and the
        step id; nothing when the step is not traced (the shard then makes no span)."""
        span = self._shard(index, address).span
        if span is None:
            return {}
        carrier: dict[str, str] = {STEP_ID_HEADER: str(self.step_id)}
        if self.per_layer:
            span = self._tracer.start_span(
                "expert.forward", context=trace.set_span_in_context(span, self._parent),
                kind=trace.SpanKind.CLIENT, attributes={"moemesh.layer": layer, "server.address": address},
            )
            self._layer_spans[(index, layer)] = span
            carrier[TRACE_LAYERS_HEADER] = "1"
        propagate.inject(carrier, context=trace.set_span_in_context(span, self._parent))
        return carrier

    def count(self, index: int, address: str, layer: int, tokens: int, seconds: float) -> None:
        """A shared-memory call (no metadata travels, no bytes on the wire): counted in the shard's step span. On
        the critical path once per layer and shard: only what the span and the metrics read."""
        stats = self.shards.get(index) or self._shard(index, address)
        stats.calls += 1
        stats.tokens += tokens
        stats.seconds += seconds
        stats.call_seconds.append(seconds)
        stats.layers.add(layer)
        if stats.span is not None:
            stats.end_ns = time.time_ns()

    def record(self, index: int, layer: int, *, tokens: int, bytes_sent: int, bytes_received: int,
               seconds: float, compute_seconds: float) -> None:
        stats = self.shards[index]
        stats.calls += 1
        stats.tokens += tokens
        stats.bytes_sent += bytes_sent
        stats.bytes_received += bytes_received
        stats.seconds += seconds
        stats.call_seconds.append(seconds)
        stats.compute_seconds += compute_seconds
        stats.layers.add(layer)
        stats.end_ns = time.time_ns()
        layer_span = self._layer_spans.pop((index, layer), None)
        if layer_span is not None:
            layer_span.set_attributes({"moemesh.tokens": tokens, "moemesh.bytes_sent": bytes_sent,
                                       "moemesh.bytes_received": bytes_received})
            layer_span.end()

    def finish(self, error: BaseException | None = None) -> None:
        for span in self._layer_spans.values():  # calls that never completed (the step failed)
            span.set_status(trace.Status(trace.StatusCode.ERROR, "call did not complete"))
            span.end()
        self._layer_spans.clear()
        for stats in self.shards.values():
            if stats.span is None:
                continue
            stats.span.set_attributes({
                "moemesh.expert.calls": stats.calls, "moemesh.expert.layers": len(stats.layers),
                "moemesh.expert.tokens": stats.tokens, "moemesh.expert.bytes_sent": stats.bytes_sent,
                "moemesh.expert.bytes_received": stats.bytes_received, "moemesh.expert.seconds": stats.seconds,
                "moemesh.expert.compute_seconds": stats.compute_seconds,
            })
            if error is not None:
                stats.span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:200]))
            stats.span.end(end_time=stats.end_ns or None)


@contextlib.contextmanager
def step_scope(step_id: int, tracer: trace.Tracer, per_layer: bool | None = None) -> Iterator[StepTrace]:
    """Runs a step under a "router.step" span with a StepTrace visible to RemoteDispatch through current_step()."""
    layered = trace_layers_enabled() if per_layer is None else per_layer
    caller = trace.get_current_span()
    if caller.get_span_context().is_valid and not caller.is_recording():  # a step the batcher did not sample
        scope = contextlib.nullcontext(caller)
    else:
        scope = tracer.start_as_current_span("router.step", attributes={"moemesh.step_id": step_id})
    with scope as span:
        step = StepTrace(step_id, tracer, layered, traced=span.is_recording())
        token = _CURRENT.set(step)
        error: BaseException | None = None
        try:
            yield step
        except BaseException as exc:
            error = exc
            raise
        finally:
            _CURRENT.reset(token)
            step.finish(error)
