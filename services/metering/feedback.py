"""Quality signals next to cost: a tenant's rating (1-5) and task-completed flag for one of its own requests.

Stored in `mm:{tenant}:feedback` (request id -> JSON); giving feedback again replaces the earlier one. Only requests
the tenant committed within the dedup window (Meter.dedup_s, 7 days by default) accept feedback; anything else —
another tenant's request, or an unknown id — is PERMISSION_DENIED, so one tenant cannot probe another's request ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.metering.errors import InvalidArgument, PermissionDenied
from services.metering.keys import TenantKeys
from services.metering.meter import check_tenant

MAX_COMMENT = 2000


@dataclass(frozen=True)
class Feedback:
    request_id: str
    rating: int = 0  # 1-5; 0: not rated
    task_completed: bool | None = None
    comment: str = ""
    at_ms: int = 0


class FeedbackStore:
    def __init__(self, redis: aioredis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.redis, self.clock = redis, clock

    async def give(self, tenant: str, fb: Feedback) -> Feedback:
        """Stores feedback of `tenant` (the authenticated caller) on its own request."""
        check_tenant(tenant)
        if not 0 <= fb.rating <= 5:
            raise InvalidArgument(f"rating: {fb.rating!r} must be 1-5 (0: not rated)")
        if fb.rating == 0 and fb.task_completed is None:
            raise InvalidArgument("feedback needs a rating (1-5) or task_completed")
        if len(fb.comment) > MAX_COMMENT:
            raise InvalidArgument(f"comment: {len(fb.comment)} characters exceed {MAX_COMMENT}")
        k = TenantKeys(tenant)
        if not fb.request_id or not await self.redis.hexists(k.done, fb.request_id):
            raise PermissionDenied(f"request {fb.request_id!r} is not a recent request of tenant {tenant!r}")
        stored = Feedback(fb.request_id, fb.rating, fb.task_completed, fb.comment, int(self.clock() * 1000))
        await self.redis.hset(k.feedback, fb.request_id, json.dumps(
            {"rating": stored.rating, "completed": stored.task_completed, "comment": stored.comment,
             "at_ms": stored.at_ms}))
        return stored

    async def get_many(self, tenant: str, request_ids: Sequence[str]) -> dict[str, Feedback]:
        if not request_ids:
            return {}
        raw = await self.redis.hmget(TenantKeys(tenant).feedback, list(request_ids))
        out = {}
        for rid, value in zip(request_ids, raw):
            if value:
                d = json.loads(value)
                out[rid] = Feedback(rid, d["rating"], d["completed"], d["comment"], d["at_ms"])
        return out
