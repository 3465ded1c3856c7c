"""Server-side spans of the per-layer Forward calls: one "expert.step" span per router step, not one per call.

The OTel server interceptor skips Expert/Forward (moemesh.serving.telemetry.UNTRACED_METHODS). Each call carries the
W3C context of the router's "expert.forward_step" span for this shard and step (services/router/step_trace.py) and
the step id; calls are aggregated by (peer, trace, parent span, step id) and become one SERVER span "expert.step"
(start of the first call to end of the last; attributes: calls, layers, tokens, bytes, compute seconds). An aggregate
is closed when the same peer starts another step (a router runs one step at a time), when it has been idle for
`idle_s` (the sweeper), or at shutdown (`close`). Calls without a trace context make no span. With the header
`moemesh-trace-layers: 1` (router env MOEMESH_TRACE_LAYERS=1) each call gets its own "expert.forward" span instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

TRACE_LAYERS_HEADER = "moemesh-trace-layers"
STEP_ID_HEADER = "moemesh-step-id"


@dataclass
class CallStats:
    """One finished Forward call."""

    layer: int
    tokens: int
    bytes_received: int
    bytes_sent: int
    compute_seconds: float
    start_ns: int
    end_ns: int
    error: str | None = None


@dataclass
class _Aggregate:
    parent: otel_context.Context
    step_id: int
    start_ns: int
    end_ns: int = 0
    calls: int = 0
    tokens: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    compute_seconds: float = 0.0
    layers: set[int] = field(default_factory=set)
    errors: int = 0
    last_error: str | None = None
    touched: float = 0.0  # monotonic time of the last call


class StepSpans:
    """Aggregates Forward calls into per-step spans. Used from the event loop thread only."""

    def __init__(self, tracer: trace.Tracer, idle_s: float = 0.25) -> None:
        self._tracer = tracer
        self.idle_s = idle_s
        self._open: dict[tuple[str, int, int, int], _Aggregate] = {}
        self._by_peer: dict[str, tuple[str, int, int, int]] = {}
        self._last_metadata: Mapping[str, str] | None = None
        self._last_parent: otel_context.Context | None = None

    def record(self, peer: str, metadata: Mapping[str, str], call: CallStats) -> None:
        if metadata is not self._last_metadata:  # the shm link passes one dict for all calls of a step
            self._last_metadata, self._last_parent = metadata, propagate.extract(metadata)
        parent = self._last_parent
        span_ctx = trace.get_current_span(parent).get_span_context()
        if not span_ctx.is_valid:
            return  # no trace context: no span (never start a root trace per call)
        step_id = _int(metadata.get(STEP_ID_HEADER))
        if metadata.get(TRACE_LAYERS_HEADER) == "1":
            self._call_span(parent, step_id, call)
            return
        key = (peer, span_ctx.trace_id, span_ctx.span_id, step_id)
        previous = self._by_peer.get(peer)
        if previous is not None and previous != key and previous in self._open:
            self._end(previous)  # this peer moved on to its next step
        self._by_peer[peer] = key
        agg = self._open.get(key)
        if agg is None:
            agg = self._open[key] = _Aggregate(parent=parent, step_id=step_id, start_ns=call.start_ns)
        agg.calls += 1
        agg.tokens += call.tokens
        agg.bytes_received += call.bytes_received
        agg.bytes_sent += call.bytes_sent
        agg.compute_seconds += call.compute_seconds
        agg.layers.add(call.layer)
        agg.start_ns = min(agg.start_ns, call.start_ns)
        agg.end_ns = max(agg.end_ns, call.end_ns)
        agg.touched = time.monotonic()
        if call.error is not None:
            agg.errors += 1
            agg.last_error = call.error

    def sweep(self, now: float | None = None) -> int:
        """Ends aggregates idle for idle_s or more; returns how many spans it ended."""
        now = time.monotonic() if now is None else now
        stale = [k for k, a in self._open.items() if now - a.touched >= self.idle_s]
        for key in stale:
            self._end(key)
        return len(stale)

    def close(self) -> int:
        """Ends every open aggregate (at shutdown)."""
        keys = list(self._open)
        for key in keys:
            self._end(key)
        return len(keys)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def _end(self, key: tuple[str, int, int, int]) -> None:
        agg = self._open.pop(key)
        if self._by_peer.get(key[0]) == key:
            del self._by_peer[key[0]]
        span = self._tracer.start_span(
            "expert.step", context=agg.parent, kind=trace.SpanKind.SERVER, start_time=agg.start_ns,
            attributes={"rpc.system": "grpc", "rpc.service": "moemesh.v1.Expert", "rpc.method": "Forward",
                        "moemesh.step_id": agg.step_id, "moemesh.expert.calls": agg.calls,
                        "moemesh.expert.layers": len(agg.layers), "moemesh.expert.tokens": agg.tokens,
                        "moemesh.expert.bytes_received": agg.bytes_received,
                        "moemesh.expert.bytes_sent": agg.bytes_sent,
                        "moemesh.expert.compute_seconds": agg.compute_seconds, "moemesh.expert.errors": agg.errors},
        )
        if agg.last_error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, agg.last_error[:200]))
        span.end(end_time=agg.end_ns)

    def _call_span(self, parent: otel_context.Context, step_id: int, call: CallStats) -> None:
        span = self._tracer.start_span(
            "expert.forward", context=parent, kind=trace.SpanKind.SERVER, start_time=call.start_ns,
            attributes={"moemesh.step_id": step_id, "moemesh.layer": call.layer, "moemesh.tokens": call.tokens,
                        "moemesh.compute_seconds": call.compute_seconds},
        )
        if call.error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, call.error[:200]))
        span.end(end_time=call.end_ns)


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0
