"""Adapter to the metering service: Authenticate (with a short local TTL cache), Reserve, Commit.

`LocalMetering` stands in when the gateway runs with auth off (`--no-auth`, local development): every request is the
dev tenant "default" and nothing is reserved or recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from gateway.events import Tenant, UsageRecord
from gateway.upstream import PeerLost, _lost
from moemesh.errors import ErrorStatus
from moemesh.v1 import metering_pb2, metering_pb2_grpc

LOCAL_TENANT = Tenant(name="default", key_id="default", namespace="default")  # = metering's dev tenant
CACHE_ENTRIES = 10_000
COMMIT_RETRY_S = 60.0  # how long a commit is retried while metering restarts
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Authenticate and Reserve: a stalled metering (SIGSTOP, a hung Redis) counts as a dead one after this long, so the
# request fails closed with UNAVAILABLE instead of hanging (supervision restarts a metering that stays silent).
METERING_CALL_S = 10.0


class UnauthenticatedError(PermissionError):
    status = ErrorStatus.UNAUTHENTICATED


class MeteringClient:
    def __init__(self, channel: grpc.aio.Channel, *, cache_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stub = metering_pb2_grpc.MeteringStub(channel)
        self._ttl = cache_seconds
        self._clock = clock
        # sha256(key) -> (tenant, expiry); only successes are cached, so a new key works at once.
        self._cache: OrderedDict[str, tuple[Tenant, float]] = OrderedDict()

    async def authenticate(self, api_key: str) -> Tenant:
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        hit = self._cache.get(digest)
        now = self._clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            response = await self._stub.Authenticate(metering_pb2.AuthenticateRequest(api_key=api_key),
                                                     timeout=METERING_CALL_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise UnauthenticatedError("authorization: unknown or revoked API key") from None
            raise _stalled(exc) from exc
        tenant = Tenant(response.tenant, response.key_id, response.weight or 1.0, response.priority,
                        response.namespace or response.tenant)
        self._cache[digest] = (tenant, now + self._ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return tenant

    async def reserve(self, request_id: str, tenant: str, model: str, prompt_tokens: int, max_tokens: int) -> None:
        try:
            await self._stub.Reserve(metering_pb2.ReserveRequest(
                request_id=request_id, tenant=tenant, model=model, prompt_tokens=prompt_tokens,
                max_completion_tokens=max_tokens,
            ), timeout=METERING_CALL_S)
        except grpc.aio.AioRpcError as exc:
            raise _stalled(exc) from exc

    async def commit(self, usage: UsageRecord) -> None:
        """Commits, retrying while metering is unreachable (a restart): Commit is idempotent by request id, so a
        retry never double-counts, and a record is lost only after COMMIT_RETRY_S of failures."""
        request = metering_pb2.CommitRequest(
            request_id=usage.request_id, tenant=usage.tenant, key_id=usage.key_id, model=usage.model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=getattr(usage, "cached_tokens", 0), latency_seconds=usage.latency_seconds,
            finish_reason=usage.finish_reason, engine_seconds=usage.engine_seconds, user=usage.user,
        )
        deadline, delay = time.monotonic() + COMMIT_RETRY_S, 0.1
        while True:
            try:
                await self._stub.Commit(request, timeout=5.0)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)


def _stalled(exc: grpc.aio.AioRpcError) -> Exception:
    """DEADLINE_EXCEEDED of our own per-call timeout means metering stalled: UNAVAILABLE, like a dead one."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerLost("metering", f"no answer in {METERING_CALL_S:.0f} s (stalled)")
    return _lost("metering", exc)


class LocalMetering:
    """Auth off: the dev tenant for everyone, no quotas, no ledger."""

    async def authenticate(self, api_key: str) -> Tenant:
        return LOCAL_TENANT

    async def reserve(self, request_id: str, tenant: str, model: str, prompt_tokens: int, max_tokens: int) -> None:
        return None

    async def commit(self, usage: UsageRecord) -> None:
        return None
