"""Tenants and their API keys, in Redis.

A tenant has a namespace (isolation scope of its prefix caches and resources; default: its name), a fair-queuing
weight and priority, and limits (0 = unlimited). API keys look like `mm-<43 url-safe chars>` (256 random bits) and are
returned only once, at creation; Redis keeps only HMAC-SHA256(server secret, key) -> (tenant, key id). A tenant may
hold several keys; rotation issues a new one and revokes the others; revocation deletes the hash at once (gateways
may still accept the key for their short auth-cache TTL).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.metering import keys
from services.metering.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from services.metering.keys import TenantKeys
from services.metering.meter import check_tenant
from services.metering.pricing import NANO_PER_USD, usd

KEY_PREFIX = "mm-"


@dataclass(frozen=True)
class Limits:
    """0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    budget_usd: float = 0.0

    def validate(self) -> None:
        for name in ("rpm", "tpm", "concurrency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgument(f"{name}: {v!r} must be an integer >= 0 (0: unlimited)")
        if not (math.isfinite(self.budget_usd) and self.budget_usd >= 0):
            raise InvalidArgument(f"budget_usd: {self.budget_usd!r} must be a number >= 0 (0: unlimited)")


@dataclass(frozen=True)
class Tenant:
    name: str
    namespace: str
    created_ms: int
    weight: float = 1.0
    priority: int = 0
    limits: Limits = field(default_factory=Limits)

    def as_dict(self) -> dict:
        return {"tenant": self.name, "namespace": self.namespace, "created_unix": self.created_ms / 1000,
                "weight": self.weight, "priority": self.priority, "rpm": self.limits.rpm, "tpm": self.limits.tpm,
                "concurrency": self.limits.concurrency, "budget_usd": self.limits.budget_usd}


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    created_ms: int
    revoked_ms: int = 0  # 0: live


@dataclass(frozen=True)
class Identity:
    """Who an API key belongs to (Authenticate)."""

    tenant: str
    key_id: str
    namespace: str
    weight: float
    priority: int


def _check_weight_priority(weight: float | None, priority: int | None) -> None:
    if weight is not None and not (math.isfinite(weight) and weight > 0):
        raise InvalidArgument(f"weight: {weight!r} must be a number > 0")
    if priority is not None and not -1000 <= priority <= 1000:
        raise InvalidArgument(f"priority: {priority!r} must be in [-1000, 1000]")


class TenantStore:
    def __init__(self, redis: aioredis.Redis, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the HMAC secret must be at least 32 bytes")
        self.redis, self._secret, self.clock = redis, secret, clock

    def digest(self, api_key: str) -> str:
        return hmac.new(self._secret, api_key.encode(), hashlib.sha256).hexdigest()

    async def create(self, name: str, namespace: str = "", limits: Limits = Limits(), weight: float = 1.0,
                     priority: int = 0) -> tuple[Tenant, str]:
        """Creates the tenant and its first key; returns (tenant, api key). AlreadyExists if the name is taken."""
        check_tenant(name)
        namespace = namespace or name
        if not keys.TENANT_NAME.match(namespace):
            raise InvalidArgument(f"namespace: {namespace!r} must match {keys.TENANT_NAME.pattern}")
        limits.validate()
        _check_weight_priority(weight, priority)
        k = TenantKeys(name)
        now_ms = int(self.clock() * 1000)
        if not await self.redis.hsetnx(k.config, "created_ms", now_ms):  # the atomic gate
            raise AlreadyExists(f"tenant {name!r} already exists")
        await self.redis.hset(k.config, mapping={
            "namespace": namespace, "weight": repr(float(weight)), "priority": priority, **_limit_fields(limits)})
        await self.redis.sadd(keys.TENANTS, name)
        _, api_key = await self.add_key(name)
        return await self.get(name), api_key

    async def get(self, name: str) -> Tenant:
        check_tenant(name)
        raw = await self.redis.hgetall(TenantKeys(name).config)
        if not raw:
            raise NotFound(f"tenant {name!r} does not exist")
        return Tenant(
            name, raw.get("namespace") or name, int(raw["created_ms"]), float(raw.get("weight") or 1.0),
            int(raw.get("priority") or 0),
            Limits(int(raw.get("rpm") or 0), int(raw.get("tpm") or 0), int(raw.get("concurrency") or 0),
                   usd(int(raw.get("budget_nano") or 0))))

    async def list(self) -> list[Tenant]:
        names = sorted(await self.redis.smembers(keys.TENANTS))
        return [await self.get(n) for n in names]

    async def set_quota(self, name: str, *, rpm: int | None = None, tpm: int | None = None,
                        concurrency: int | None = None, budget_usd: float | None = None,
                        weight: float | None = None, priority: int | None = None) -> Tenant:
        """Changes the given settings (None: unchanged). Reserve reads them on every call: effective at once."""
        current = await self.get(name)
        lim = current.limits
        new = Limits(lim.rpm if rpm is None else rpm, lim.tpm if tpm is None else tpm,
                     lim.concurrency if concurrency is None else concurrency,
                     lim.budget_usd if budget_usd is None else budget_usd)
        new.validate()
        _check_weight_priority(weight, priority)
        fields = _limit_fields(new)
        if weight is not None:
            fields["weight"] = repr(float(weight))
        if priority is not None:
            fields["priority"] = priority
        await self.redis.hset(TenantKeys(name).config, mapping=fields)
        return await self.get(name)

    async def add_key(self, name: str) -> tuple[str, str]:
        """Issues one more key for the tenant; returns (key id, api key). The key is not stored anywhere."""
        check_tenant(name)
        k = TenantKeys(name)
        if not await self.redis.exists(k.config):
            raise NotFound(f"tenant {name!r} does not exist")
        key_id = "key_" + secrets.token_hex(6)
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = self.digest(api_key)
        info = {"digest": digest, "created_ms": int(self.clock() * 1000), "revoked_ms": 0}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.api_key(digest), mapping={"tenant": name, "key_id": key_id})
            pipe.hset(k.keys, key_id, json.dumps(info))
            await pipe.execute()
        return key_id, api_key

    async def keys(self, name: str) -> list[KeyInfo]:
        await self.get(name)
        raw = await self.redis.hgetall(TenantKeys(name).keys)
        infos = [KeyInfo(kid, int(v["created_ms"]), int(v["revoked_ms"]))
                 for kid, v in ((kid, json.loads(s)) for kid, s in raw.items())]
        return sorted(infos, key=lambda i: (i.created_ms, i.key_id))

    async def revoke_key(self, name: str, key_id: str) -> None:
        """Revokes one key at once. NotFound for a key id the tenant does not have; revoking twice is a no-op."""
        check_tenant(name)
        k = TenantKeys(name)
        raw = await self.redis.hget(k.keys, key_id)
        if raw is None:
            raise NotFound(f"tenant {name!r} has no key {key_id!r}")
        info = json.loads(raw)
        if info["revoked_ms"]:
            return
        info["revoked_ms"] = int(self.clock() * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(info["digest"]))
            pipe.hset(k.keys, key_id, json.dumps(info))
            await pipe.execute()

    async def rotate_key(self, name: str) -> tuple[str, str, list[str]]:
        """Issues a new key and revokes every other live key; returns (key id, api key, revoked key ids)."""
        key_id, api_key = await self.add_key(name)
        revoked = [i.key_id for i in await self.keys(name) if not i.revoked_ms and i.key_id != key_id]
        for old in revoked:
            await self.revoke_key(name, old)
        return key_id, api_key, revoked

    async def authenticate(self, api_key: str) -> Identity:
        """The tenant of a live key; Unauthenticated otherwise (the message never echoes the key)."""
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            raise Unauthenticated("invalid API key")
        found = await self.redis.hgetall(keys.api_key(self.digest(api_key)))
        if not found:
            raise Unauthenticated("invalid or revoked API key")
        try:
            tenant = await self.get(found["tenant"])
        except NotFound:
            raise Unauthenticated("the API key's tenant no longer exists") from None
        return Identity(tenant.name, found["key_id"], tenant.namespace, tenant.weight, tenant.priority)


async def require_tenant(redis: aioredis.Redis, name: str) -> None:
    """NotFound unless the tenant exists (for readers that need no secret)."""
    check_tenant(name)
    if not await redis.exists(TenantKeys(name).config):
        raise NotFound(f"tenant {name!r} does not exist")


def _limit_fields(limits: Limits) -> dict:
    return {"rpm": limits.rpm, "tpm": limits.tpm, "concurrency": limits.concurrency,
            "budget_nano": round(limits.budget_usd * NANO_PER_USD)}
