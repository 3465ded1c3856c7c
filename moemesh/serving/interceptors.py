"""Server interceptor that turns handler exceptions into gRPC statuses, refuses calls while draining, and records
the RPC metrics. It sits inside the OpenTelemetry interceptor, so an abort here also sets the span's status.

Handlers are coroutines (unary responses) or async generators (streamed responses), as in grpc's asyncio examples.
Health and reflection are left alone: they are grpc's own servicers (Health/Watch writes with context.write).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from moemesh.serving import errors, metrics

log = logging.getLogger(__name__)

UNTOUCHED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


@dataclass
class DrainState:
    """Shared between the server and its interceptor: once `draining`, new calls get UNAVAILABLE."""

    draining: bool = False


class StatusInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, drain: DrainState) -> None:
        self._service = service
        self._drain = drain

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(UNTOUCHED_PREFIXES):
            return handler
        return _rewrap(handler, lambda behavior, streaming: self._wrap(behavior, streaming, method))

    def _wrap(self, behavior: Callable, response_streaming: bool, method: str) -> Callable:
        if response_streaming:
            return self._wrap_stream(behavior, method)
        return self._wrap_unary(behavior, method)

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        async def unary(request, context):
            with _Recorder(self._service, method, context) as rec:
                await self._refuse_if_draining(context)
                try:
                    _check_decoded(request)
                    result = behavior(request, context)
                    return (await result) if inspect.isawaitable(result) else result
                except Exception as exc:
                    await rec.abort(exc)

        return unary

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        async def stream(request, context):
            with _Recorder(self._service, method, context) as rec:
                await self._refuse_if_draining(context)
                try:
                    _check_decoded(request)
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    await rec.abort(exc)

        return stream

    async def _refuse_if_draining(self, context) -> None:
        if self._drain.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._service} is shutting down; retry elsewhere")


class _Recorder:
    """Counts one RPC, times it, and maps its exception (if any) to an abort."""

    def __init__(self, service: str, method: str, context) -> None:
        self.service, self.method, self.context = service, method, context
        self.code = grpc.StatusCode.OK

    def __enter__(self) -> _Recorder:
        self.start = time.perf_counter()
        metrics.RPC_STARTED.labels(self.service, self.method).inc()
        metrics.RPC_IN_FLIGHT.labels(self.service).inc()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
        elif exc_type is not None and self.code == grpc.StatusCode.OK:
            self.code = _context_code(self.context) or grpc.StatusCode.UNKNOWN
        metrics.RPC_IN_FLIGHT.labels(self.service).dec()
        metrics.RPC_HANDLED.labels(self.service, self.method, self.code.name).inc()
        metrics.RPC_SECONDS.labels(self.service, self.method).observe(time.perf_counter() - self.start)

    async def abort(self, exc: Exception) -> None:
        """Aborts the call with the status policy of errors.status_for (always raises)."""
        if isinstance(exc, grpc.aio.AbortError):
            self.code = _context_code(self.context) or grpc.StatusCode.UNKNOWN
            raise exc
        code, details, trailing = errors.status_for(exc)
        self.code = code
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", self.method, details, exc_info=exc)
            trace.get_current_span().record_exception(exc)
        else:
            log.info("%s -> %s: %s", self.method, code.name, details)
        await self.context.abort(code, details, trailing_metadata=trailing)


def _context_code(context) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:  # older contexts or wrappers without code()
        return None
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return code


def _rewrap(handler, wrap: Callable[[Callable, bool], Callable]):
    """A new RpcMethodHandler of the same kind whose behavior is wrap(old behavior, response_streaming)."""
    if handler.request_streaming and handler.response_streaming:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    deserializer = handler.request_deserializer
    return factory(
        wrap(behavior, handler.response_streaming),
        request_deserializer=deserializer if handler.request_streaming else _tolerant(deserializer),
        response_serializer=handler.response_serializer,
    )


class _Undecodable:
    """A unary request whose bytes did not parse. grpc would answer UNKNOWN ("Unexpected DecodeError"); the
    wrapped behavior answers INVALID_ARGUMENT instead: garbage from a client is the client's error."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError (corrupt wire format, bad UTF-8 in a string field)
            return _Undecodable(exc)

    return parse


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise ValueError(f"request: not a valid protobuf message ({request.error})")
