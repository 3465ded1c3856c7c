"""OpenTelemetry for the mesh: one TracerProvider per process named after the service, W3C trace context on every
gRPC hop (server interceptor + client channels), and the exporter: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set,
else one JSON object per span appended to MOEMESH_HOME/traces/<service>.jsonl (read by `moemesh trace`).

The request id (`chatcmpl-...`) travels as W3C baggage `moemesh.request_id`; every span started under it carries the
attribute `moemesh.request_id`, which is how `moemesh trace <request-id>` finds the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, client_interceptor
from opentelemetry.instrumentation.grpc import grpcext
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from moemesh import home
from moemesh.certs import grpc_tls

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "moemesh.request_id"
# Expert tensors of a large batch step exceed gRPC's 4 MiB default message size.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# A peer restarted by `moemesh up` (or Kubernetes) is back on its address within seconds: reconnect attempts stay
# at most 2 s apart (gRPC's default backoff grows to 120 s, so a channel could fail fast long after the peer is back).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# Per-layer calls: thousands per request. The expert aggregates them into one span per step and shard
# (services/expert/step_spans.py); the router calls them on an untraced channel (services/router/step_trace.py).
# Watch: a router's long-lived liveness stream of a shard (services/router/shard_watch.py): a span would last hours.
UNTRACED_METHODS: frozenset[str] = frozenset({"/moemesh.v1.Expert/Forward", "/moemesh.v1.Expert/Watch"})
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_state: dict[str, TracerProvider | str] = {}
_lock = threading.Lock()


def span_record(span: ReadableSpan) -> dict:
    """The JSONL form of a finished span (times in Unix nanoseconds; ids in lowercase hex)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name", ""),
        "kind": span.kind.name if span.kind is not None else "",
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
    }


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


class JsonlSpanExporter(SpanExporter):
    """Appends one JSON line per span to a file (one file per process, so no two writers share a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), separators=(",", ":")) + "\n" for s in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


class RequestIdSpanProcessor(SpanProcessor):
    """Copies the baggage entry moemesh.request_id onto every span started under it."""

    def on_start(self, span, parent_context=None) -> None:
        value = baggage.get_baggage(REQUEST_ID_KEY, parent_context)
        if value:
            span.set_attribute(REQUEST_ID_KEY, str(value))


def traces_path(service: str) -> Path:
    return home.subdir("traces") / f"{service}.jsonl"


def setup_tracing(service: str) -> TracerProvider:
    """Installs the process's TracerProvider (once; later calls return the first one). OTEL_SERVICE_NAME, when set,
    overrides `service`, so that `moemesh up` can name the two expert processes expert-0 and expert-1."""
    with _lock:
        if "provider" in _state:
            return _state["provider"]  # type: ignore[return-value]
        name = os.environ.get("OTEL_SERVICE_NAME") or service
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(RequestIdSpanProcessor())
        provider.add_span_processor(BatchSpanProcessor(_exporter(name), schedule_delay_millis=200))
        trace.set_tracer_provider(provider)
        propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
        _state.update(provider=provider, service=name)
        return provider


def _exporter(service: str) -> SpanExporter:
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    return JsonlSpanExporter(traces_path(service))


def flush_tracing(timeout_s: float = 5.0) -> None:
    """Exports every finished span now (call before reading the JSONL files, and at exit)."""
    provider = _state.get("provider")
    if isinstance(provider, TracerProvider):
        provider.force_flush(int(timeout_s * 1000))


def tracer(name: str = "moemesh") -> trace.Tracer:
    return trace.get_tracer(name)


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Marks the current span and everything started inside (here and downstream, via baggage) with the request id."""
    trace.get_current_span().set_attribute(REQUEST_ID_KEY, request_id)
    token = context.attach(baggage.set_baggage(REQUEST_ID_KEY, request_id))
    try:
        yield
    finally:
        context.detach(token)


def _traced(details) -> bool:
    """Server-side filter: no spans for health checks and reflection (`moemesh up` polls them) nor for
    UNTRACED_METHODS (per-layer calls, aggregated into per-step spans by their services instead)."""
    method = getattr(details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode()
    return not (method.startswith(_UNTRACED_PREFIXES) or method in UNTRACED_METHODS)


def server_interceptor() -> grpc.aio.ServerInterceptor:
    """The OTel server interceptor: a SERVER span per call (except health, reflection and UNTRACED_METHODS), in the
    remote parent's trace (W3C traceparent + baggage from the metadata)."""
    return aio_server_interceptor(filter_=_traced)


def client_channel(address: str, options: Sequence[tuple[str, object]] = (), *,
                   traced: bool = True) -> grpc.aio.Channel:
    """An insecure aio channel whose calls make CLIENT spans and carry the trace context (traced=False: neither).
    Must be called inside the running event loop: a channel created outside it is bound to no loop and fails."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(f"client_channel({address!r}) must be called inside a running event loop") from None
    interceptors = aio_client_interceptors() if traced else None
    return grpc_tls.aio_channel(address, [*CHANNEL_OPTIONS, *options], interceptors)  # mTLS with MOEMESH_MTLS


def sync_client_channel(address: str, options: Sequence[tuple[str, object]] = (), *,
                        traced: bool = True) -> grpc.Channel:
    """A blocking channel for worker threads (stubs support `.future()` fan-out). The thread must run with the
    caller's context (asyncio.to_thread copies it; loop.run_in_executor does not) for spans to join the trace.
    traced=False: no spans and no propagation (the caller injects the context into metadata itself)."""
    channel = grpc_tls.channel(address, [*CHANNEL_OPTIONS, *options])  # mTLS with MOEMESH_MTLS
    return grpcext.intercept_channel(channel, client_interceptor()) if traced else channel
