"""Quota admission and usage accounting: Reserve before a request runs, Commit when it ends, expiry of the rest.

Limits (per tenant, read from Redis on every Reserve, so `moemesh tenants set-quota` acts at once; 0 = unlimited):
- rpm / tpm: admissions and their tokens in a sliding 60 s window (exact: at most N in any 60 s). A reservation
  counts prompt + max completion tokens; its commit replaces that by the actual tokens (the refund).
- concurrency: reservations in flight.
- budget: dollars per calendar month (UTC): committed spend of the month plus money held by in-flight reservations
  (estimated price) must stay within it. Spend is charged to the month of the commit; a hold is released from the
  month it was made in.

A reservation whose commit never comes expires after its TTL and is refunded (held money, window tokens, its
concurrency slot); expiry is lazy in every script, and `sweep()` (run periodically by the service) makes it prompt.
Commit is idempotent by request id for `dedup_s` (default 7 days): a retry returns the first result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import redis.asyncio as aioredis

from services.metering import keys, periods, scripts
from services.metering.errors import InvalidArgument, NeverFits, NotFound, QuotaExceeded
from services.metering.keys import TenantKeys
from services.metering.ledger import Usage, UsageRecord
from services.metering.pricing import HardwareTable, PriceTable, usd

_LIMIT_TEXT = {
    "rpm": "requests per minute limit {limit} reached",
    "tpm": "tokens per minute limit {limit} reached",
    "concurrency": "concurrent requests limit {limit} reached",
    "budget": "monthly budget ${usd:.6f} would be exceeded",
}


@dataclass(frozen=True)
class Reservation:
    request_id: str
    expires_in_s: float  # 0 when the request id was already committed
    estimated_tokens: int
    estimated_price_usd: float


@dataclass(frozen=True)
class CommitResult:
    record: UsageRecord  # for a duplicate: request id, prices and ledger id of the first commit only
    duplicate: bool


def _check_id(request_id: str) -> None:
    if not request_id or len(request_id) > 128 or any(c.isspace() for c in request_id):
        raise InvalidArgument(f"request_id: {request_id!r} must be 1-128 characters without spaces")


def check_tenant(tenant: str) -> None:
    if not keys.TENANT_NAME.match(tenant or ""):
        raise InvalidArgument(f"tenant: {tenant!r} must match {keys.TENANT_NAME.pattern}")


class Meter:
    """Reserve / commit / expire against one Redis. `clock` returns Unix seconds (injected by tests)."""

    def __init__(self, redis: aioredis.Redis, prices: PriceTable | None = None, hardware: HardwareTable | None = None,
                 *, default_hardware: str = "cpu:shared", default_devices: int = 1,
                 clock: Callable[[], float] = time.time, reservation_ttl_s: float = 300.0, window_s: float = 60.0,
                 dedup_s: float = 7 * 86400, busy_retry_ms: int = 250) -> None:
        self.redis = redis
        self.prices = prices or PriceTable()
        self.hardware = hardware or HardwareTable()
        self.hardware.get(default_hardware)  # fail at start on an unknown default
        self.default_hardware, self.default_devices = default_hardware, default_devices
        self.clock = clock
        self.ttl_ms, self.window_ms = int(reservation_ttl_s * 1000), int(window_s * 1000)
        self.dedup_ms, self.busy_retry_ms = int(dedup_s * 1000), busy_retry_ms
        self._reserve = redis.register_script(scripts.RESERVE)
        self._commit = redis.register_script(scripts.COMMIT)
        self._expire = redis.register_script(scripts.EXPIRE)

    async def reserve(self, tenant: str, request_id: str, model: str, prompt_tokens: int,
                      max_completion_tokens: int, ttl_s: float | None = None) -> Reservation:
        """Admits the request or raises QuotaExceeded / NeverFits / NotFound. Idempotent by request id."""
        check_tenant(tenant)
        _check_id(request_id)
        for name, v in (("prompt_tokens", prompt_tokens), ("max_completion_tokens", max_completion_tokens)):
            if v < 0:
                raise InvalidArgument(f"{name}: {v!r} must be >= 0")
        if ttl_s is not None and not 0 <= ttl_s <= 86400:
            raise InvalidArgument(f"ttl_seconds: {ttl_s!r} must be in [0, 86400] (0: the default)")
        ttl_ms = self.ttl_ms if not ttl_s else int(ttl_s * 1000)
        now_s = self.clock()
        now_ms = int(now_s * 1000)
        tokens = prompt_tokens + max_completion_tokens
        nano = self.prices.price_nano(model, prompt_tokens, max_completion_tokens)
        month_ms = int(periods.next_month_start(now_s) * 1000) - now_ms
        status, second, limit = await self._reserve(
            keys=TenantKeys(tenant).script_keys(),
            args=[request_id, now_ms, tokens, nano, ttl_ms, periods.month_of(now_s), self.window_ms, month_ms,
                  self.busy_retry_ms])
        if status in ("ok", "committed"):
            return Reservation(request_id, int(second) / 1000.0, tokens, usd(nano))
        if status == "unknown_tenant":
            raise NotFound(f"tenant {tenant!r} does not exist")
        if status == "tpm_never":
            raise NeverFits(tenant, "tpm", f"request too large: {tokens} tokens (prompt {prompt_tokens} + max "
                            f"completion {max_completion_tokens}) exceed the tokens per minute limit {limit}; "
                            "lower max_tokens")
        if status == "budget_never":
            raise NeverFits(tenant, "budget", f"request too large: its estimated price ${usd(nano):.6f} exceeds "
                            f"the monthly budget ${usd(int(limit)):.6f}; lower max_tokens")
        detail = _LIMIT_TEXT[status].format(limit=limit, usd=usd(int(limit)))
        raise QuotaExceeded(tenant, status, limit, max(1, int(second)), detail)

    def _validate(self, u: Usage) -> None:
        check_tenant(u.tenant)
        _check_id(u.request_id)
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "devices"):
            if getattr(u, name) < 0:
                raise InvalidArgument(f"{name}: {getattr(u, name)!r} must be >= 0")
        if u.cached_tokens > u.prompt_tokens:
            raise InvalidArgument(f"cached_tokens: {u.cached_tokens} exceeds prompt_tokens {u.prompt_tokens}")
        for name in ("latency_s", "engine_s"):
            v = getattr(u, name)
            if not (math.isfinite(v) and v >= 0):
                raise InvalidArgument(f"{name}: {v!r} must be a finite number >= 0")
        if len(u.finish_reason) > 32 or len(u.model) > 256 or len(u.user) > 256 or len(u.key_id) > 64:
            raise InvalidArgument("finish_reason/model/user/key_id: too long")

    async def commit(self, usage: Usage) -> CommitResult:
        """Records actual usage, charges its price, refunds the rest of the reservation. Idempotent."""
        self._validate(usage)
        hardware = usage.hardware or self.default_hardware
        devices = usage.devices or self.default_devices
        try:
            cost = self.hardware.cost_pico(hardware, devices, usage.engine_s)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        now_s = self.clock()
        now_ms = int(now_s * 1000)
        price = self.prices.price_nano(usage.model, usage.prompt_tokens, usage.completion_tokens,
                                       usage.cached_tokens)
        record = UsageRecord(**{**usage.__dict__, "hardware": hardware, "devices": devices},
                             price_nano=price, cost_pico=cost, at_ms=now_ms)
        status, second = await self._commit(
            keys=TenantKeys(usage.tenant).script_keys(),
            args=[usage.request_id, now_ms, usage.prompt_tokens + usage.completion_tokens, price, cost,
                  periods.month_of(now_s), now_ms - self.dedup_ms, self.window_ms, *record.stream_fields()])
        if status == "unknown_tenant":
            raise NotFound(f"tenant {usage.tenant!r} does not exist")
        if status == "duplicate":
            first_price, first_cost, ledger_id = second.split(" ")
            first = UsageRecord(usage.request_id, usage.tenant, price_nano=int(first_price),
                                cost_pico=int(first_cost), ledger_id=ledger_id)
            return CommitResult(first, duplicate=True)
        return CommitResult(replace(record, ledger_id=second), duplicate=False)

    async def expire(self, tenant: str) -> int:
        """Refunds the tenant's expired reservations now; returns how many."""
        return int(await self._expire(keys=TenantKeys(tenant).script_keys(),
                                      args=[int(self.clock() * 1000), self.window_ms]))

    async def sweep(self) -> int:
        """expire() for every tenant."""
        total = 0
        async for tenant in self.redis.sscan_iter(keys.TENANTS):
            total += await self.expire(tenant)
        return total

    async def month_totals(self, tenant: str, unix_s: float | None = None) -> tuple[float, float]:
        """(spent, held) dollars of the tenant's month containing unix_s (default now)."""
        month = periods.month_of(self.clock() if unix_s is None else unix_s)
        spent, held = await self.redis.hmget(TenantKeys(tenant).state, f"{month}:spent", f"{month}:held")
        return usd(int(spent or 0)), usd(int(held or 0))
