"""Quality signals next to cost: a tenant's rating (1-5) and task-completed flag for one of its own requests.

Stored in `mm:{tenant}:feedback` (request id -> JSON, the comment sealed with AES-256-GCM: sealing.py); giving feedback again replaces the earlier one. Only requests
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
from services.metering.sealing import TextSealer

MAX_COMMENT = 2000


@dataclass(frozen=True)
class Feedback:
    request_id: str
    rating: int = 0  # 1-5; 0: not rated
    task_completed: bool | None = None
    comment: str = ""
    at_ms: int = 0


class FeedbackStore:
    def __init__(self, redis: aioredis.Redis, clock: Callable[[], float] = time.time,
                 sealer: TextSealer | None = None) -> None:
        self.redis, self.clock = redis, clock
        self.sealer = sealer or TextSealer.load()

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
        await self.redis.hset(k.feedback, fb.request_id, self._encode(tenant, stored))
        return stored

    def _encode(self, tenant: str, fb: Feedback) -> str:
        comment = self.sealer.seal(fb.comment, _place(tenant, fb.request_id)) if fb.comment else ""
        return json.dumps({"rating": fb.rating, "completed": fb.task_completed, "comment": comment,
                           "at_ms": fb.at_ms})

    async def reseal(self, tenant: str) -> int:
        """Rewrites the tenant's comments under the current key (key rotation); returns how many changed."""
        key, changed = TenantKeys(tenant).feedback, 0
        for rid, value in (await self.redis.hgetall(key)).items():
            if not json.loads(value)["comment"] or self.sealer.is_current(json.loads(value)["comment"]):
                continue
            fb = (await self.get_many(tenant, [rid]))[rid]
            await self.redis.hset(key, rid, self._encode(tenant, fb))
            changed += 1
        return changed

    async def get_many(self, tenant: str, request_ids: Sequence[str]) -> dict[str, Feedback]:
        if not request_ids:
            return {}
        raw = await self.redis.hmget(TenantKeys(tenant).feedback, list(request_ids))
        out = {}
        for rid, value in zip(request_ids, raw):
            if value:
                d = json.loads(value)
                comment = self.sealer.open(d["comment"], _place(tenant, rid)) if d["comment"] else ""
                out[rid] = Feedback(rid, d["rating"], d["completed"], comment, d["at_ms"])
        return out


def _place(tenant: str, request_id: str) -> str:
    """Associated data of a sealed comment: it opens only in this tenant's slot for this request."""
    return f"feedback|{tenant}|{request_id}"
