"""Domain errors of metering. Each names its gRPC status in `grpc_status` (a code name: domain code imports no
grpc); moemesh.serving's status interceptor aborts with it and sends `retry_after_ms` as trailing metadata
`retry-after-ms`."""

from __future__ import annotations


class MeteringError(Exception):
    """Base class."""

    grpc_status = "INTERNAL"


class InvalidArgument(MeteringError, ValueError):
    """Bad input; the message names the field and value (INVALID_ARGUMENT)."""

    grpc_status = "INVALID_ARGUMENT"


class NotFound(MeteringError):
    """Unknown tenant or key id (NOT_FOUND)."""

    grpc_status = "NOT_FOUND"


class AlreadyExists(MeteringError):
    """Tenant name taken (ALREADY_EXISTS)."""

    grpc_status = "ALREADY_EXISTS"


class Unauthenticated(MeteringError):
    """Unknown or revoked API key (UNAUTHENTICATED)."""

    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(MeteringError):
    """The caller's tenant may not touch this tenant's data or request (PERMISSION_DENIED)."""

    grpc_status = "PERMISSION_DENIED"


class QuotaExceeded(MeteringError):
    """A limit would be exceeded now; retry after `retry_after_ms` (RESOURCE_EXHAUSTED + `retry-after-ms`)."""

    grpc_status = "RESOURCE_EXHAUSTED"

    def __init__(self, tenant: str, limit: str, value: float, retry_after_ms: int, detail: str) -> None:
        super().__init__(f"tenant {tenant!r}: {detail}; retry after {retry_after_ms} ms")
        self.tenant = tenant
        self.limit = limit  # "rpm", "tpm", "concurrency", "budget"
        self.value = value
        self.retry_after_ms = retry_after_ms


class NeverFits(MeteringError):
    """The request alone exceeds a limit, so no retry can succeed (RESOURCE_EXHAUSTED without `retry-after-ms`,
    as OpenAI answers 429 "Request too large")."""

    grpc_status = "RESOURCE_EXHAUSTED"

    def __init__(self, tenant: str, limit: str, detail: str) -> None:
        super().__init__(f"tenant {tenant!r}: {detail}")
        self.tenant = tenant
        self.limit = limit
