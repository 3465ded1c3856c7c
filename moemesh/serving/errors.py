"""Exception -> gRPC status policy of every moemesh service (applied by interceptors.StatusInterceptor): the servicer
edge, the one place where a domain failure becomes a gRPC code.

A handler never lets a known failure surface as UNKNOWN: builtin exception classes map to the codes below, a domain
error declares its kind with a `status` attribute (a moemesh.errors.ErrorStatus, mapped to the gRPC code of the
same name), an error from an upstream call keeps the upstream code, and anything else is INTERNAL (with its
traceback logged).
"""

from __future__ import annotations

import grpc

from moemesh.errors import ErrorStatus, ServiceError, status_of

__all__ = ["BUILTIN_STATUS", "ServiceError", "grpc_code", "status_for"]

# Checked in order: the first matching class wins (KeyError is a LookupError; TimeoutError is an OSError).
BUILTIN_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (LookupError, grpc.StatusCode.NOT_FOUND),
)


def grpc_code(status: ErrorStatus) -> grpc.StatusCode:
    """The gRPC code a domain status becomes (members are named like gRPC's codes; a test checks every one)."""
    return grpc.StatusCode[status.name]


def _details(exc: BaseException) -> str:
    # KeyError's str() is the repr of its key ("'foo'"); the message reads better without the quotes.
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    text = str(exc)
    return text or type(exc).__name__


def _upstream_retry_after(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """An upstream's retry-after-ms hint, passed on to our caller."""
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return []
    return [(k, str(v)) for k, v in metadata if k == "retry-after-ms"]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for an exception a handler raised. INTERNAL means "log the traceback"."""
    trailing: list[tuple[str, str]] = []
    retry = getattr(exc, "retry_after_ms", None)
    if retry is not None:
        trailing.append(("retry-after-ms", str(int(retry))))
    if getattr(exc, "error_code", None):  # not passed on from upstream: its code names the upstream's own fields
        trailing.append(("error-code", str(exc.error_code)))
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        trailing.extend(_upstream_retry_after(exc) if retry is None else ())
        code = exc.code()
        # An upstream UNKNOWN is still a failure we did not understand: report it as INTERNAL.
        code = grpc.StatusCode.INTERNAL if code in (None, grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK) else code
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        return code, details or code.name, tuple(trailing)
    status = status_of(exc)
    if status is not None:
        return grpc_code(status), _details(exc), tuple(trailing)
    for cls, code in BUILTIN_STATUS:
        if isinstance(exc, cls):
            return code, _details(exc), tuple(trailing)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {_details(exc)}", tuple(trailing)
