"""moemesh.v1.Metering over gRPC: protobuf <-> domain values only. Domain errors carry their status code (errors.py);
a lost Redis connection becomes UNAVAILABLE."""

from __future__ import annotations

import functools

import grpc
import redis.exceptions

from moemesh.errors import ErrorStatus, ServiceError
from moemesh.v1 import metering_pb2 as pb
from moemesh.v1 import metering_pb2_grpc
from services.metering import metrics
from services.metering.admin import METADATA_KEY, AdminGuard
from services.metering.errors import NeverFits, PermissionDenied, QuotaExceeded
from services.metering.feedback import Feedback, FeedbackStore
from services.metering.ledger import Usage, read_ledger
from services.metering.meter import Meter, check_tenant
from services.metering.report import Totals, build_report
from services.metering.tenants import Limits, Tenant, TenantStore

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Metering"].full_name
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _redis_unavailable(handler):
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except _REDIS_DOWN as exc:
            raise ServiceError(f"metering cannot reach Redis: {exc}", status=ErrorStatus.UNAVAILABLE) from exc

    return wrapped


def _admin(handler):
    """Admin RPCs: the caller must present the admin token (services/metering/admin.py)."""
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        self._check_admin(context)
        return await handler(self, request, context)

    return wrapped


def _period(request: pb.GetUsageRequest) -> tuple[float, float | None]:
    return float(request.since_unix), float(request.until_unix) if request.until_unix else None


def _check_caller(request: pb.GetUsageRequest) -> None:
    if request.caller_tenant and request.caller_tenant != request.tenant:
        raise PermissionDenied(f"tenant {request.caller_tenant!r} may not read the usage of another tenant")


def _quota(limits: Limits) -> pb.Quota:
    return pb.Quota(requests_per_minute=limits.rpm, tokens_per_minute=limits.tpm,
                    concurrent_requests=limits.concurrency, monthly_budget_usd=limits.budget_usd)


def _report(tenant: str, totals: Totals, by_model: dict[str, Totals]) -> pb.UsageReport:
    d = totals.as_dict()
    models = [pb.ModelUsage(model=m, requests=t.requests, prompt_tokens=t.prompt_tokens,
                            completion_tokens=t.completion_tokens, price_usd=t.as_dict()["price_usd"],
                            cost_usd=t.as_dict()["cost_usd"], satisfaction=t.as_dict()["satisfaction"] or 0.0)
              for m, t in sorted(by_model.items())]
    return pb.UsageReport(
        tenant=tenant, requests=d["requests"], prompt_tokens=d["prompt_tokens"],
        completion_tokens=d["completion_tokens"], price_usd=d["price_usd"], cost_usd=d["cost_usd"],
        cached_tokens=d["cached_tokens"], engine_seconds=d["engine_s"], margin_usd=d["margin_usd"],
        rated_requests=d["rated_requests"], satisfaction=d["satisfaction"] or 0.0,
        task_completion_rate=d["task_completion_rate"] or 0.0, task_completion_answers=totals.completion_answers,
        models=models)


class MeteringServicer(metering_pb2_grpc.MeteringServicer):
    def __init__(self, meter: Meter, tenants: TenantStore, feedback: FeedbackStore,
                 admin_token: str | None = None) -> None:
        self.meter, self.tenants, self.feedback = meter, tenants, feedback
        self._admin = AdminGuard(admin_token)

    def _check_admin(self, context) -> None:
        presented = next((v for k, v in context.invocation_metadata() or () if k == METADATA_KEY), None)
        self._admin.check(presented if isinstance(presented, str) else None)

    @_redis_unavailable
    async def Authenticate(self, request: pb.AuthenticateRequest, context) -> pb.AuthenticateResponse:
        who = await self.tenants.authenticate(request.api_key)
        return pb.AuthenticateResponse(tenant=who.tenant, key_id=who.key_id, weight=who.weight,
                                       priority=who.priority, namespace=who.namespace)

    @_redis_unavailable
    async def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveResponse:
        try:
            r = await self.meter.reserve(request.tenant, request.request_id, request.model, request.prompt_tokens,
                                         request.max_completion_tokens, ttl_s=request.ttl_seconds or None)
        except (QuotaExceeded, NeverFits) as exc:
            metrics.QUOTA_REJECTIONS.labels(exc.tenant, exc.limit).inc()
            raise
        return pb.ReserveResponse(reservation_id=r.request_id, expires_in_s=round(r.expires_in_s),
                                  estimated_tokens=r.estimated_tokens, estimated_price_usd=r.estimated_price_usd)

    @_redis_unavailable
    async def Commit(self, request: pb.CommitRequest, context) -> pb.CommitResponse:
        usage = Usage(request.request_id, request.tenant, request.key_id, request.model, request.user,
                      request.prompt_tokens, request.completion_tokens, request.cached_tokens,
                      request.latency_seconds, request.finish_reason, request.engine_seconds, request.hardware,
                      request.devices)
        result = await self.meter.commit(usage)
        r = result.record
        if result.duplicate:
            metrics.DUPLICATE_COMMITS.labels(usage.tenant).inc()
        else:
            for kind, n in (("prompt", r.prompt_tokens), ("completion", r.completion_tokens),
                            ("cached", r.cached_tokens)):
                metrics.TOKENS.labels(r.tenant, r.model, kind).inc(n)
            metrics.REQUESTS.labels(r.tenant, r.model, r.finish_reason or "unknown").inc()
            metrics.CHARGED_USD.labels(r.tenant, r.model).inc(r.price_usd)
            metrics.COST_USD.labels(r.tenant, r.model).inc(r.cost_usd)
            metrics.ENGINE_SECONDS.labels(r.tenant, r.model).inc(r.engine_s)
        return pb.CommitResponse(price_usd=r.price_usd, cost_usd=r.cost_usd, duplicate=result.duplicate,
                                 ledger_id=r.ledger_id)

    @_redis_unavailable
    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.UsageReport:
        _check_caller(request)
        if not request.caller_tenant:  # any tenant's usage: an admin read
            self._check_admin(context)
        await self.tenants.get(request.tenant)
        report = await build_report(self.meter.redis, request.tenant, *_period(request))
        return _report(request.tenant, report.totals, report.by_model)

    async def ExportUsage(self, request: pb.GetUsageRequest, context):
        _check_caller(request)
        if not request.caller_tenant:
            self._check_admin(context)
        check_tenant(request.tenant)
        try:
            await self.tenants.get(request.tenant)
            report = await build_report(self.meter.redis, request.tenant, *_period(request), with_rows=True)
        except _REDIS_DOWN as exc:
            raise ServiceError(f"metering cannot reach Redis: {exc}", status=ErrorStatus.UNAVAILABLE) from exc
        for row in report.rows:
            rec = pb.UsageRecord(
                ledger_id=row["ledger_id"], at_unix=row["at_unix"], request_id=row["request_id"],
                tenant=row["tenant"], key_id=row["key_id"], model=row["model"], user=row["user"],
                prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
                cached_tokens=row["cached_tokens"], latency_seconds=row["latency_s"],
                finish_reason=row["finish_reason"], engine_seconds=row["engine_s"], hardware=row["hardware"],
                devices=row["devices"], price_usd=row["price_usd"], cost_usd=row["cost_usd"],
                rating=row["rating"] or 0)
            if row["task_completed"] is not None:
                rec.task_completed = row["task_completed"]
            yield rec

    @_redis_unavailable
    async def Feedback(self, request: pb.FeedbackRequest, context) -> pb.FeedbackResponse:
        completed = request.task_completed if request.HasField("task_completed") else None
        stored = await self.feedback.give(request.tenant, Feedback(request.request_id, request.rating, completed,
                                                                   request.comment))
        metrics.FEEDBACK.labels(request.tenant, {True: "yes", False: "no", None: "unanswered"}[completed]).inc()
        if stored.rating:
            metrics.RATING.labels(request.tenant).observe(stored.rating)
        return pb.FeedbackResponse(recorded_unix=stored.at_ms / 1000.0)

    async def _info(self, t: Tenant, with_keys: bool) -> pb.TenantInfo:
        spent, held = await self.meter.month_totals(t.name)
        info = pb.TenantInfo(name=t.name, namespace=t.namespace, created_unix=t.created_ms / 1000.0,
                             weight=t.weight, priority=t.priority, quota=_quota(t.limits), month_spent_usd=spent,
                             month_held_usd=held)
        if with_keys:
            info.keys.extend(pb.KeyInfo(key_id=k.key_id, created_unix=k.created_ms / 1000.0,
                                        revoked_unix=k.revoked_ms / 1000.0) for k in await self.tenants.keys(t.name))
        return info

    @_redis_unavailable
    @_admin
    async def CreateTenant(self, request: pb.CreateTenantRequest, context) -> pb.CreateTenantResponse:
        q = request.quota
        limits = Limits(q.requests_per_minute, q.tokens_per_minute, q.concurrent_requests, q.monthly_budget_usd)
        tenant, api_key = await self.tenants.create(request.name, request.namespace, limits,
                                                    request.weight or 1.0, request.priority)
        info = await self._info(tenant, with_keys=True)
        return pb.CreateTenantResponse(tenant=info, api_key=api_key, key_id=info.keys[0].key_id)

    @_redis_unavailable
    @_admin
    async def GetTenant(self, request: pb.GetTenantRequest, context) -> pb.TenantInfo:
        return await self._info(await self.tenants.get(request.name), with_keys=True)

    @_redis_unavailable
    @_admin
    async def ListTenants(self, request: pb.ListTenantsRequest, context) -> pb.ListTenantsResponse:
        return pb.ListTenantsResponse(tenants=[await self._info(t, False) for t in await self.tenants.list()])

    @_redis_unavailable
    @_admin
    async def SetQuota(self, request: pb.SetQuotaRequest, context) -> pb.TenantInfo:
        def opt(name):
            return getattr(request, name) if request.HasField(name) else None

        tenant = await self.tenants.set_quota(
            request.name, rpm=opt("requests_per_minute"), tpm=opt("tokens_per_minute"),
            concurrency=opt("concurrent_requests"), budget_usd=opt("monthly_budget_usd"), weight=opt("weight"),
            priority=opt("priority"))
        return await self._info(tenant, with_keys=True)

    @_redis_unavailable
    @_admin
    async def IssueKey(self, request: pb.IssueKeyRequest, context) -> pb.IssueKeyResponse:
        if request.revoke_others:
            key_id, api_key, revoked = await self.tenants.rotate_key(request.name)
        else:
            (key_id, api_key), revoked = await self.tenants.add_key(request.name), []
        return pb.IssueKeyResponse(api_key=api_key, key_id=key_id, revoked_key_ids=revoked)

    @_redis_unavailable
    @_admin
    async def RevokeKey(self, request: pb.RevokeKeyRequest, context) -> pb.RevokeKeyResponse:
        await self.tenants.revoke_key(request.name, request.key_id)
        return pb.RevokeKeyResponse()


def add_to_server(servicer: MeteringServicer, server: grpc.aio.Server) -> list[str]:
    metering_pb2_grpc.add_MeteringServicer_to_server(servicer, server)
    return [SERVICE_NAME]

