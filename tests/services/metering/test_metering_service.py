"""moemesh.v1.Metering over real gRPC (127.0.0.1, port 0) on a real Redis: status codes, trailing metadata, admin."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from moemesh.serving import client_channel, serve_in_process
from moemesh.v1 import metering_pb2 as pb
from moemesh.v1 import metering_pb2_grpc
from services.metering.connection import make_client
from services.metering.feedback import FeedbackStore
from services.metering.meter import Meter
from services.metering.servicer import MeteringServicer, add_to_server
from services.metering.tenants import TenantStore

from .conftest import SECRET

ADMIN = "admin-token-for-this-test-0123456789abcdef"
ADMIN_MD = [("x-moemesh-admin-token", ADMIN)]


class AdminMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Unary calls only: metadata added by an aio unary-stream interceptor does not reach the server (grpcio 1.84);
    streaming calls pass it themselves."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("x-moemesh-admin-token", self.token)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


@pytest.fixture
async def stub(redis):
    tenants, meter, feedback = TenantStore(redis, SECRET), Meter(redis), FeedbackStore(redis)
    servicer = MeteringServicer(meter, tenants, feedback, admin_token=ADMIN)
    async with serve_in_process(lambda server: add_to_server(servicer, server), name="metering") as svc:
        channel = grpc.aio.insecure_channel(svc.address, interceptors=[AdminMetadata(ADMIN)])
        yield metering_pb2_grpc.MeteringStub(channel)
        await channel.close()


@pytest.fixture
async def anonymous(stub, redis):
    """A second metering on the same Redis, called without the admin token."""
    servicer = MeteringServicer(Meter(redis), TenantStore(redis, SECRET), FeedbackStore(redis), admin_token=ADMIN)
    async with serve_in_process(lambda server: add_to_server(servicer, server), name="metering") as svc:
        channel = client_channel(svc.address)
        yield metering_pb2_grpc.MeteringStub(channel)
        await channel.close()


async def test_admin_operations_need_the_admin_token(stub, anonymous) -> None:
    await _tenant(stub, "acme")
    calls = [anonymous.CreateTenant(pb.CreateTenantRequest(name="evil")),
             anonymous.SetQuota(pb.SetQuotaRequest(name="acme", tokens_per_minute=10**9)),
             anonymous.IssueKey(pb.IssueKeyRequest(name="acme")), anonymous.ListTenants(pb.ListTenantsRequest()),
             anonymous.GetTenant(pb.GetTenantRequest(name="acme")),
             anonymous.RevokeKey(pb.RevokeKeyRequest(name="acme", key_id="x")),
             anonymous.GetUsage(pb.GetUsageRequest(tenant="acme"))]
    for call in calls:
        assert (await _code(call)).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = [("x-moemesh-admin-token", "y" * 40)]
    err = await _code(anonymous.CreateTenant(pb.CreateTenantRequest(name="evil"), metadata=wrong))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _code(anonymous.ExportUsage(pb.GetUsageRequest(tenant="acme")).read())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # a tenant's own usage (what the gateway asks for its caller) needs no admin token
    assert (await anonymous.GetUsage(pb.GetUsageRequest(tenant="acme", caller_tenant="acme"))).requests == 0
    assert [t.name for t in (await stub.ListTenants(pb.ListTenantsRequest())).tenants] == ["acme"]


async def _tenant(stub, name: str, **quota) -> str:
    created = await stub.CreateTenant(pb.CreateTenantRequest(name=name, quota=pb.Quota(**quota)))
    return created.api_key


async def _code(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


async def test_authenticate(stub) -> None:
    key = await _tenant(stub, "acme")
    who = await stub.Authenticate(pb.AuthenticateRequest(api_key=key))
    assert (who.tenant, who.namespace, who.weight) == ("acme", "acme", 1.0) and who.key_id.startswith("key_")
    err = await _code(stub.Authenticate(pb.AuthenticateRequest(api_key=key + "x")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and key not in err.details()


async def test_over_quota_is_resource_exhausted_with_retry_after(stub) -> None:
    await _tenant(stub, "acme", requests_per_minute=1, tokens_per_minute=1000)
    ok = await stub.Reserve(pb.ReserveRequest(request_id="r1", tenant="acme", model="m", prompt_tokens=10,
                                              max_completion_tokens=90))
    assert ok.reservation_id == "r1" and ok.expires_in_s == 300 and ok.estimated_tokens == 100
    err = await _code(stub.Reserve(pb.ReserveRequest(request_id="r2", tenant="acme", model="m", prompt_tokens=1)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests per minute" in err.details()
    retry = dict(err.trailing_metadata())["retry-after-ms"]
    assert 59_000 <= int(retry) <= 60_000
    too_big = await _code(stub.Reserve(pb.ReserveRequest(request_id="r3", tenant="acme", model="m",
                                                         max_completion_tokens=5000)))
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request too large" in too_big.details()
    assert "retry-after-ms" not in dict(too_big.trailing_metadata())
    rejected = REGISTRY.get_sample_value("moemesh_metering_quota_rejections_total",
                                         {"tenant": "acme", "limit": "rpm"})
    assert rejected is not None and rejected >= 1


async def test_commit_is_idempotent_and_feeds_usage_and_metrics(stub) -> None:
    await _tenant(stub, "acme")
    before = REGISTRY.get_sample_value("moemesh_metering_tokens_total",
                                       {"tenant": "acme", "model": "m", "kind": "completion"}) or 0.0
    await stub.Reserve(pb.ReserveRequest(request_id="r1", tenant="acme", model="m", prompt_tokens=10,
                                         max_completion_tokens=100))
    commit = pb.CommitRequest(request_id="r1", tenant="acme", key_id="k", model="m", prompt_tokens=10,
                              completion_tokens=30, engine_seconds=0.2, finish_reason="stop", user="u1")
    first = await stub.Commit(commit)
    again = await stub.Commit(commit)
    assert not first.duplicate and again.duplicate and again.price_usd == first.price_usd == pytest.approx(4e-5)
    assert first.cost_usd == pytest.approx(0.2 * 0.0425 / 3600) and again.ledger_id == first.ledger_id
    usage = await stub.GetUsage(pb.GetUsageRequest(tenant="acme"))
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (1, 10, 30)
    assert usage.margin_usd == pytest.approx(first.price_usd - first.cost_usd)
    after = REGISTRY.get_sample_value("moemesh_metering_tokens_total",
                                      {"tenant": "acme", "model": "m", "kind": "completion"})
    assert after - before == 30
    records = [r async for r in stub.ExportUsage(pb.GetUsageRequest(tenant="acme"), metadata=ADMIN_MD)]
    assert [(r.request_id, r.user, r.HasField("task_completed")) for r in records] == [("r1", "u1", False)]


async def test_tenants_cannot_read_or_rate_each_others_requests(stub) -> None:
    await _tenant(stub, "a")
    await _tenant(stub, "b")
    await stub.Commit(pb.CommitRequest(request_id="b1", tenant="b", model="m", completion_tokens=5))
    err = await _code(stub.GetUsage(pb.GetUsageRequest(tenant="b", caller_tenant="a")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _code(stub.ExportUsage(pb.GetUsageRequest(tenant="b", caller_tenant="a")).read())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _code(stub.Feedback(pb.FeedbackRequest(tenant="a", request_id="b1", rating=1)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    fb = await stub.Feedback(pb.FeedbackRequest(tenant="b", request_id="b1", rating=4, task_completed=True))
    assert fb.recorded_unix > 0
    usage = await stub.GetUsage(pb.GetUsageRequest(tenant="b", caller_tenant="b"))
    assert (usage.rated_requests, usage.satisfaction, usage.task_completion_rate) == (1, 4.0, 1.0)


async def test_admin_rpcs(stub) -> None:
    created = await stub.CreateTenant(pb.CreateTenantRequest(name="acme", weight=2.0))
    err = await _code(stub.CreateTenant(pb.CreateTenantRequest(name="acme")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    info = await stub.SetQuota(pb.SetQuotaRequest(name="acme", tokens_per_minute=500, monthly_budget_usd=9.5))
    assert (info.quota.tokens_per_minute, info.quota.monthly_budget_usd, info.weight) == (500, 9.5, 2.0)
    rotated = await stub.IssueKey(pb.IssueKeyRequest(name="acme", revoke_others=True))
    assert list(rotated.revoked_key_ids) == [created.key_id]
    err = await _code(stub.Authenticate(pb.AuthenticateRequest(api_key=created.api_key)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.RevokeKey(pb.RevokeKeyRequest(name="acme", key_id=rotated.key_id))
    info = await stub.GetTenant(pb.GetTenantRequest(name="acme"))
    assert [k.revoked_unix > 0 for k in info.keys] == [True, True]
    assert [t.name for t in (await stub.ListTenants(pb.ListTenantsRequest())).tenants] == ["acme"]
    err = await _code(stub.GetTenant(pb.GetTenantRequest(name="nobody")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await _code(stub.CreateTenant(pb.CreateTenantRequest(name="Bad Name")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in err.details()


async def test_lost_redis_is_unavailable() -> None:
    dead = make_client("unix:///nonexistent/redis.sock", max_connections=2, timeout=1)
    servicer = MeteringServicer(Meter(dead), TenantStore(dead, SECRET), FeedbackStore(dead))
    async with serve_in_process(lambda server: add_to_server(servicer, server), name="metering") as svc:
        channel = client_channel(svc.address)
        stub = metering_pb2_grpc.MeteringStub(channel)
        err = await _code(stub.Authenticate(pb.AuthenticateRequest(api_key="mm-x")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in err.details()
        await channel.close()
    await dead.aclose()
