"""Quota admission against a real Redis: exact under concurrency, refunds, expiry, the monthly budget."""

from __future__ import annotations

import asyncio

import pytest

from services.metering.errors import InvalidArgument, NeverFits, NotFound, QuotaExceeded
from services.metering.ledger import Usage
from services.metering.meter import Meter
from services.metering.periods import next_month_start
from services.metering.pricing import ModelPrice, PriceTable
from services.metering.tenants import Limits, TenantStore

from .conftest import SECRET


async def _tenant(redis, clock, name="acme", **limits) -> TenantStore:
    store = TenantStore(redis, SECRET, clock)
    await store.create(name, limits=Limits(**limits))
    return store


async def _outcomes(coros) -> tuple[int, list[QuotaExceeded]]:
    results = await asyncio.gather(*coros, return_exceptions=True)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, QuotaExceeded)]
    assert not unexpected, unexpected[:3]
    return sum(not isinstance(r, BaseException) for r in results), [r for r in results if isinstance(r, QuotaExceeded)]


async def test_500_concurrent_reserves_against_a_budget_for_100_grant_exactly_100(redis, clock) -> None:
    # $0.001 per 1k tokens: 10 prompt + 90 completion tokens = 100 tokens = $0.0001 held each; budget $0.01 = 100.
    await _tenant(redis, clock, budget_usd=0.01)
    meters = [Meter(redis, clock=clock) for _ in range(4)]  # several "replicas" on one Redis
    granted, rejected = await _outcomes(
        meters[i % 4].reserve("acme", f"r{i}", "m", 10, 90) for i in range(500))
    assert granted == 100
    assert len(rejected) == 400 and {e.limit for e in rejected} == {"budget"}
    spent, held = await meters[0].month_totals("acme")
    assert (spent, held) == (0.0, pytest.approx(0.01))


async def test_concurrent_reserves_respect_concurrency_rpm_and_tpm_exactly(redis, clock) -> None:
    await _tenant(redis, clock, "conc", concurrency=7)
    await _tenant(redis, clock, "rpm", rpm=13)
    await _tenant(redis, clock, "tpm", tpm=1000)  # 100 tokens each -> 10
    meter = Meter(redis, clock=clock)
    for tenant, want in (("conc", 7), ("rpm", 13), ("tpm", 10)):
        granted, rejected = await _outcomes(meter.reserve(tenant, f"{tenant}{i}", "m", 50, 50) for i in range(60))
        assert granted == want, tenant
        assert {e.limit for e in rejected} == {tenant if tenant != "conc" else "concurrency"}
        assert all(e.retry_after_ms > 0 for e in rejected)


async def test_rpm_retry_after_points_at_the_oldest_admission_leaving_the_window(redis, clock) -> None:
    await _tenant(redis, clock, rpm=2)
    meter = Meter(redis, clock=clock)
    await meter.reserve("acme", "a", "m", 1, 1)
    clock.advance(20)
    await meter.reserve("acme", "b", "m", 1, 1)
    clock.advance(10)
    with pytest.raises(QuotaExceeded) as exc:
        await meter.reserve("acme", "c", "m", 1, 1)
    assert exc.value.retry_after_ms == 30_000  # "a" leaves the 60 s window 30 s from now
    clock.advance(30)
    await meter.reserve("acme", "c", "m", 1, 1)


async def test_commit_refunds_unused_tokens_to_the_window(redis, clock) -> None:
    await _tenant(redis, clock, tpm=1000)
    meter = Meter(redis, clock=clock)
    await meter.reserve("acme", "a", "m", 100, 900)
    with pytest.raises(QuotaExceeded) as exc:
        await meter.reserve("acme", "b", "m", 100, 400)
    assert exc.value.limit == "tpm" and exc.value.retry_after_ms == 60_000
    await meter.commit(Usage("a", "acme", prompt_tokens=100, completion_tokens=20))  # 880 tokens come back
    await meter.reserve("acme", "b", "m", 100, 400)


async def test_uncommitted_reservation_expires_and_is_refunded(redis, clock) -> None:
    await _tenant(redis, clock, concurrency=1, budget_usd=0.001)
    meter = Meter(redis, clock=clock, reservation_ttl_s=2)
    await meter.reserve("acme", "abandoned", "m", 100, 900)  # $0.001: the whole budget and the only slot
    assert await meter.month_totals("acme") == (0.0, pytest.approx(0.001))
    with pytest.raises(QuotaExceeded):
        await meter.reserve("acme", "next", "m", 1, 1)
    clock.advance(2.5)
    assert await meter.sweep() == 1
    assert await meter.month_totals("acme") == (0.0, 0.0)
    await meter.reserve("acme", "next", "m", 1, 1)


async def test_expiry_is_lazy_without_the_sweeper(redis, clock) -> None:
    await _tenant(redis, clock, concurrency=1)
    meter = Meter(redis, clock=clock, reservation_ttl_s=1)
    await meter.reserve("acme", "abandoned", "m", 1, 1)
    clock.advance(1.5)
    await meter.reserve("acme", "next", "m", 1, 1)  # the reserve script itself refunds the expired one


async def test_a_late_commit_after_expiry_is_still_recorded_once(redis, clock) -> None:
    await _tenant(redis, clock, budget_usd=1.0)
    meter = Meter(redis, clock=clock, reservation_ttl_s=1)
    await meter.reserve("acme", "slow", "m", 100, 900)
    clock.advance(5)
    await meter.sweep()
    result = await meter.commit(Usage("slow", "acme", model="m", prompt_tokens=100, completion_tokens=100))
    assert not result.duplicate and result.record.price_usd == pytest.approx(0.0002)
    assert await meter.month_totals("acme") == (pytest.approx(0.0002), 0.0)


async def test_budget_is_per_calendar_month_utc(redis, clock) -> None:
    # clock starts 2025-12-31 23:00 UTC; $0.001 per 1k tokens; budget $0.002
    await _tenant(redis, clock, budget_usd=0.002)
    meter = Meter(redis, clock=clock)
    for i in range(2):
        await meter.reserve("acme", f"dec{i}", "m", 500, 500)
        await meter.commit(Usage(f"dec{i}", "acme", model="m", prompt_tokens=500, completion_tokens=500))
    with pytest.raises(QuotaExceeded) as exc:
        await meter.reserve("acme", "dec2", "m", 1, 1)
    assert exc.value.limit == "budget"
    assert exc.value.retry_after_ms == pytest.approx((next_month_start(clock()) - clock()) * 1000, abs=1)
    clock.advance(3600)  # 2026-01-01 00:00 UTC: a new month, a new budget
    await meter.reserve("acme", "jan0", "m", 500, 500)
    assert await meter.month_totals("acme", clock() - 1) == (pytest.approx(0.002), 0.0)
    assert await meter.month_totals("acme") == (0.0, pytest.approx(0.001))


async def test_budget_blocked_only_by_holds_suggests_a_short_retry(redis, clock) -> None:
    await _tenant(redis, clock, budget_usd=0.001)
    meter = Meter(redis, clock=clock, busy_retry_ms=250)
    await meter.reserve("acme", "a", "m", 500, 500)
    with pytest.raises(QuotaExceeded) as exc:
        await meter.reserve("acme", "b", "m", 1, 1)
    assert exc.value.retry_after_ms == 250


async def test_set_quota_acts_on_the_next_reserve(redis, clock) -> None:
    store = await _tenant(redis, clock, rpm=1)
    meter = Meter(redis, clock=clock)
    await meter.reserve("acme", "a", "m", 1, 1)
    with pytest.raises(QuotaExceeded):
        await meter.reserve("acme", "b", "m", 1, 1)
    await store.set_quota("acme", rpm=0)
    await meter.reserve("acme", "b", "m", 1, 1)


async def test_reserve_is_idempotent_by_request_id(redis, clock) -> None:
    await _tenant(redis, clock, concurrency=1, tpm=100)
    meter = Meter(redis, clock=clock)
    first = await meter.reserve("acme", "a", "m", 10, 10)
    clock.advance(1)
    again = await meter.reserve("acme", "a", "m", 10, 10)
    assert again.expires_in_s == pytest.approx(first.expires_in_s - 1)
    assert await redis.hget("mm:{acme}:state", "win_tokens") == "20"


async def test_requests_that_can_never_fit_are_refused_without_retry(redis, clock) -> None:
    await _tenant(redis, clock, tpm=100, budget_usd=0.0001)
    meter = Meter(redis, clock=clock)
    with pytest.raises(NeverFits, match="tokens per minute limit 100"):
        await meter.reserve("acme", "a", "m", 50, 51)
    await redis.hset("mm:{acme}:config", "tpm", 0)
    with pytest.raises(NeverFits, match="monthly budget"):
        await meter.reserve("acme", "a", "m", 50, 100)


async def test_model_prices_set_the_hold(redis, clock) -> None:
    await _tenant(redis, clock, budget_usd=3.0)
    meter = Meter(redis, PriceTable(models={"big": ModelPrice(1.0, 2.0)}), clock=clock)
    r = await meter.reserve("acme", "a", "big", 1000, 500)
    assert r.estimated_price_usd == pytest.approx(2.0)
    assert r.estimated_tokens == 1500


async def test_bad_input_names_the_field(redis, clock) -> None:
    await _tenant(redis, clock)
    meter = Meter(redis, clock=clock)
    with pytest.raises(NotFound, match="'nobody'"):
        await meter.reserve("nobody", "a", "m", 1, 1)
    with pytest.raises(InvalidArgument, match="request_id"):
        await meter.reserve("acme", "", "m", 1, 1)
    with pytest.raises(InvalidArgument, match="tenant"):
        await meter.reserve("Not A Name", "a", "m", 1, 1)
    with pytest.raises(InvalidArgument, match="prompt_tokens"):
        await meter.reserve("acme", "a", "m", -1, 1)
