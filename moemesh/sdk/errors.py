"""Typed errors of the moemesh Python SDK, one per gRPC status a caller handles differently.

    try:
        reply = model.chat(conversation)
    except RateLimitError as exc:
        time.sleep(exc.retry_after or 1.0)
    except BadRequestError as exc:
        print("fix", exc.field)            # e.g. "temperature" for "temperature: -1.0 is not in [0, 2]"

Every error carries `code` (the gRPC status name) and `message` (the server's text).
"""

from __future__ import annotations

import re

import grpc

_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class MoemeshError(Exception):
    """Base of every SDK error."""

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(f"{code}: {message}")
        self.message, self.code = message, code


class AuthenticationError(MoemeshError):
    """The API key is missing, unknown or revoked (UNAUTHENTICATED)."""


class PermissionDeniedError(MoemeshError):
    """The key is valid but may not do this (PERMISSION_DENIED)."""


class RateLimitError(MoemeshError):
    """A quota or rate limit is exhausted (RESOURCE_EXHAUSTED); `retry_after` seconds, when the server said."""

    def __init__(self, message: str, *, code: str = "RESOURCE_EXHAUSTED", retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class BadRequestError(MoemeshError):
    """The request is invalid (INVALID_ARGUMENT, OUT_OF_RANGE); `field` names the offending field when known."""

    def __init__(self, message: str, *, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message, code=code)
        match = _FIELD.match(message)
        self.field = match.group(1) if match else None


class NotFoundError(MoemeshError):
    """No such model or method (NOT_FOUND, UNIMPLEMENTED)."""


class APITimeoutError(MoemeshError):
    """The request did not finish in time (DEADLINE_EXCEEDED)."""


class ServiceUnavailableError(MoemeshError):
    """The mesh cannot serve right now (UNAVAILABLE); retrying later may work."""


class ServerError(MoemeshError):
    """The mesh failed (INTERNAL and anything else)."""


class StreamError(MoemeshError):
    """A stream failed after it had started; the text received so far is incomplete."""

    def __init__(self, message: str, *, code: str = "INTERNAL", type: str = "server_error") -> None:
        super().__init__(message, code=code)
        self.type = type


_BY_CODE: dict[grpc.StatusCode, type[MoemeshError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.OUT_OF_RANGE: BadRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNIMPLEMENTED: NotFoundError,
    grpc.StatusCode.DEADLINE_EXCEEDED: APITimeoutError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
}


def _retry_after(error: grpc.RpcError) -> float | None:
    try:
        metadata = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return None
    for key, value in metadata:
        if key == "retry-after-ms":
            try:
                return int(value) / 1000.0
            except ValueError:
                return None
    return None


def from_rpc_error(error: grpc.RpcError) -> MoemeshError:
    """The typed SDK error for a failed gRPC call."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN  # type: ignore
    details = (error.details() if callable(getattr(error, "details", None)) else None) or str(code)  # type: ignore
    cls = _BY_CODE.get(code, ServerError)
    if cls is RateLimitError:
        return RateLimitError(details, code=code.name, retry_after=_retry_after(error))
    return cls(details, code=code.name)


def from_stream_error(code: str, message: str, type: str) -> MoemeshError:
    """The error a stream reported in-band after its first chunk."""
    return StreamError(message or "the stream failed", code=code or "INTERNAL", type=type or "server_error")
