"""Domain errors of metering. Each says its kind in `status` (a moemesh.errors.ErrorStatus: domain code names no gRPC
code); moemesh.serving's status interceptor aborts with the matching gRPC code and sends `retry_after_ms` as trailing
metadata `retry-after-ms`."""

from __future__ import annotations

from moemesh.errors import ErrorStatus


class MeteringError(Exception):
    """Base class."""

    status = ErrorStatus.INTERNAL


class InvalidArgument(MeteringError, ValueError):
    """Bad input; the message names the field and value (INVALID_ARGUMENT)."""

    status = ErrorStatus.INVALID_ARGUMENT


class NotFound(MeteringError):
    """Unknown tenant or key id (NOT_FOUND)."""

    status = ErrorStatus.NOT_FOUND


class AlreadyExists(MeteringError):
    """Tenant name taken (ALREADY_EXISTS)."""

    status = ErrorStatus.ALREADY_EXISTS


class Unauthenticated(MeteringError):
    """Unknown or revoked API key (UNAUTHENTICATED)."""

    status = ErrorStatus.UNAUTHENTICATED


class PermissionDenied(MeteringError):
    """The caller's tenant may not touch this tenant's data or request (PERMISSION_DENIED)."""

    status = ErrorStatus.PERMISSION_DENIED


class QuotaExceeded(MeteringError):
    """A limit would be exceeded now; retry after `retry_after_ms` (RESOURCE_EXHAUSTED + `retry-after-ms`)."""

    status = ErrorStatus.RESOURCE_EXHAUSTED

    def __init__(self, tenant: str, limit: str, value: float, retry_after_ms: int, detail: str) -> None:
        super().__init__(f"tenant {tenant!r}: {detail}; retry after {retry_after_ms} ms")
        self.tenant = tenant
        self.limit = limit  # "rpm", "tpm", "concurrency", "budget"
        self.value = value
        self.retry_after_ms = retry_after_ms


class NeverFits(MeteringError):
    """The request alone exceeds a limit, so no retry can succeed (RESOURCE_EXHAUSTED without `retry-after-ms`,
    as OpenAI answers 429 "Request too large")."""

    status = ErrorStatus.RESOURCE_EXHAUSTED

    def __init__(self, tenant: str, limit: str, detail: str) -> None:
        super().__init__(f"tenant {tenant!r}: {detail}")
        self.tenant = tenant
        self.limit = limit
