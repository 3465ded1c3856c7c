"""Domain failure codes, without any transport: a domain error says what kind of failure it is with a `status`
attribute (an `ErrorStatus`); the servicer edge (moemesh/serving/errors.py, applied by the status interceptor) maps
it to the gRPC status code of the same name. Domain code imports neither grpc nor *_pb2, so it names no gRPC code.

    class QuotaExceeded(Exception):
        status = ErrorStatus.RESOURCE_EXHAUSTED
"""

from __future__ import annotations

import enum


class ErrorStatus(enum.Enum):
    """What a caller can do about a failure. Each member is named like the gRPC code it becomes at the edge."""

    INVALID_ARGUMENT = enum.auto()  # the request itself is wrong: do not retry it unchanged
    NOT_FOUND = enum.auto()  # the named thing (tenant, key, sequence) does not exist
    ALREADY_EXISTS = enum.auto()  # the thing to create is there already
    PERMISSION_DENIED = enum.auto()  # the caller is known but may not do this
    UNAUTHENTICATED = enum.auto()  # the caller did not prove who it is
    RESOURCE_EXHAUSTED = enum.auto()  # a limit or queue is full: retry later (retry_after_ms when known)
    FAILED_PRECONDITION = enum.auto()  # the system is not in a state that allows this (configuration)
    DEADLINE_EXCEEDED = enum.auto()  # the request's deadline passed
    UNAVAILABLE = enum.auto()  # a peer or the service is down or closing: retry, maybe elsewhere
    INTERNAL = enum.auto()  # a bug on this side (including a peer refusing what we sent it)


def status_of(exc: BaseException) -> ErrorStatus | None:
    """The exception's domain status, None when it declares none (an attribute `status` of another type, e.g. an
    HTTP library's int, is no domain status)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, ErrorStatus) else None


class ServiceError(Exception):
    """A domain failure with an explicit status. Subclass it and set `status`, or pass `status=`.

    `retry_after_ms` (when set) travels as trailing metadata `retry-after-ms`, the hint RESOURCE_EXHAUSTED carries.
    `error_code` (on any exception; e.g. "context_length_exceeded") travels as trailing metadata `error-code`: the
    machine-readable reason a caller can act on, and the edge's OpenAI `code`.
    """

    status: ErrorStatus = ErrorStatus.FAILED_PRECONDITION
    retry_after_ms: int | None = None

    def __init__(self, message: str, *, status: ErrorStatus | None = None,
                 retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            if not isinstance(status, ErrorStatus):
                raise TypeError(f"status must be a moemesh.errors.ErrorStatus, got {status!r}")
            self.status = status
        if retry_after_ms is not None:
            self.retry_after_ms = retry_after_ms
