"""Commit and the usage ledger against a real Redis: idempotency, prices, cost of goods, reports, feedback."""

from __future__ import annotations

import asyncio
import csv
import io

import pytest

from services.metering.errors import InvalidArgument, NotFound, PermissionDenied
from services.metering.feedback import Feedback, FeedbackStore
from services.metering.ledger import Usage, read_ledger
from services.metering.meter import Meter
from services.metering.pricing import HardwareTable, ModelPrice, PriceTable
from services.metering.report import build_report, rows_csv
from services.metering.tenants import TenantStore

from .conftest import SECRET


@pytest.fixture
async def meter(redis, clock) -> Meter:
    store = TenantStore(redis, SECRET, clock)
    for name in ("acme", "beta"):
        await store.create(name)
    return Meter(redis, clock=clock)


def _usage(rid: str, tenant: str = "acme", **kw) -> Usage:
    base = dict(key_id="key_1", model="m", prompt_tokens=100, completion_tokens=50, engine_s=0.5,
                finish_reason="stop", latency_s=1.25)
    return Usage(rid, tenant, **{**base, **kw})


async def test_committing_the_same_request_twice_counts_once(meter: Meter, redis, clock) -> None:
    await meter.reserve("acme", "r1", "m", 100, 200)
    first = await meter.commit(_usage("r1"))
    clock.advance(1)
    again = await meter.commit(_usage("r1", completion_tokens=999))
    assert not first.duplicate and again.duplicate
    assert (again.record.price_nano, again.record.ledger_id) == (first.record.price_nano, first.record.ledger_id)
    assert [r.request_id async for r in read_ledger(redis, "acme")] == ["r1"]
    assert await meter.month_totals("acme") == (pytest.approx(0.00015), 0.0)


async def test_concurrent_retries_of_one_commit_append_one_record(meter: Meter, redis) -> None:
    results = await asyncio.gather(*(meter.commit(_usage("r1")) for _ in range(50)))
    assert sum(not r.duplicate for r in results) == 1
    assert len([r async for r in read_ledger(redis, "acme")]) == 1


async def test_ledger_record_has_price_cost_and_margin(meter: Meter, redis, clock) -> None:
    hardware = HardwareTable.from_mapping({"h100:spot": {"unit": "gpu", "usd_per_hour": 3.6}})
    m = Meter(redis, PriceTable(models={"big": ModelPrice(0.01, 0.03, cached_input_per_1k=0.001)}), hardware,
              clock=clock)
    result = await m.commit(_usage("r1", model="big", prompt_tokens=1000, cached_tokens=400, completion_tokens=100,
                                   engine_s=2.0, hardware="h100:spot", devices=2, user="u-7"))
    rec = result.record
    assert rec.price_usd == pytest.approx(600 * 0.01 / 1000 + 400 * 0.001 / 1000 + 100 * 0.03 / 1000)
    assert rec.cost_usd == pytest.approx(2.0 * 3.6 * 2 / 3600)  # engine s x $/GPU-h x GPUs
    assert rec.margin_usd == pytest.approx(rec.price_usd - rec.cost_usd)
    [stored] = [r async for r in read_ledger(redis, "acme")]
    assert stored == rec


async def test_sum_of_costs_equals_engine_time_times_hardware_price(meter: Meter, redis) -> None:
    # The batcher splits each step's duration over the requests in it; the cost of goods must add back up.
    shares = [0.013 * (i % 7 + 1) for i in range(200)]
    for i, share in enumerate(shares):
        await meter.commit(_usage(f"r{i}", engine_s=share, hardware="cpu:spot", devices=16))
    report = await build_report(redis, "acme")
    expected = sum(shares) * 0.02125 * 16 / 3600
    assert report.totals.as_dict()["cost_usd"] == pytest.approx(expected, rel=1e-6)  # p$ rounding per record


async def test_ledger_ids_increase_even_when_the_clock_goes_back(meter: Meter, redis, clock) -> None:
    await meter.commit(_usage("a"))
    clock.advance(-5)
    await meter.commit(_usage("b"))
    ids = [r.ledger_id async for r in read_ledger(redis, "acme")]
    assert len(ids) == 2 and ids[0].split("-")[0] == ids[1].split("-")[0] and ids[1].endswith("-1")


async def test_report_period_and_feedback(meter: Meter, redis, clock) -> None:
    t0 = clock()
    for i in range(6):
        await meter.commit(_usage(f"r{i}", model="m" if i % 2 else "n"))
        clock.advance(600)
    feedback = FeedbackStore(redis, clock)
    await feedback.give("acme", Feedback("r0", rating=5, task_completed=True))
    await feedback.give("acme", Feedback("r1", rating=2, task_completed=False, comment="wrong answer"))
    await feedback.give("acme", Feedback("r1", rating=3, task_completed=False))  # replaces the first
    await feedback.give("acme", Feedback("r4", task_completed=True))
    report = await build_report(redis, "acme", since_s=t0, until_s=t0 + 1800, with_rows=True)  # r0, r1, r2
    d = report.as_dict()
    assert (d["requests"], d["prompt_tokens"], d["completion_tokens"]) == (3, 300, 150)
    assert d["price_usd"] == pytest.approx(0.00045) and d["satisfaction"] == 4.0
    assert d["task_completion_rate"] == 0.5 and sorted(d["by_model"]) == ["m", "n"]
    rows = list(csv.DictReader(io.StringIO(rows_csv(report.rows))))
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[1]["rating"] == "3" and rows[1]["task_completed"] == "False" and rows[2]["rating"] == ""


async def test_feedback_only_by_the_tenant_that_made_the_request(meter: Meter, redis, clock) -> None:
    await meter.commit(_usage("b-req", tenant="beta"))
    feedback = FeedbackStore(redis, clock)
    with pytest.raises(PermissionDenied):
        await feedback.give("acme", Feedback("b-req", rating=1))
    with pytest.raises(PermissionDenied):
        await feedback.give("acme", Feedback("no-such-request", rating=1))
    with pytest.raises(InvalidArgument, match="rating"):
        await feedback.give("beta", Feedback("b-req", rating=6))
    with pytest.raises(InvalidArgument, match="task_completed"):
        await feedback.give("beta", Feedback("b-req"))
    await feedback.give("beta", Feedback("b-req", rating=4))


async def test_commit_validates_its_input(meter: Meter) -> None:
    with pytest.raises(InvalidArgument, match="cached_tokens"):
        await meter.commit(_usage("x", cached_tokens=101))
    with pytest.raises(InvalidArgument, match="engine_s"):
        await meter.commit(_usage("x", engine_s=float("nan")))
    with pytest.raises(InvalidArgument, match="hardware 'tpu:spot'"):
        await meter.commit(_usage("x", hardware="tpu:spot"))
    with pytest.raises(NotFound):
        await meter.commit(_usage("x", tenant="nobody"))


async def test_old_request_ids_are_forgotten_after_the_dedup_window(redis, clock) -> None:
    await TenantStore(redis, SECRET, clock).create("acme")
    meter = Meter(redis, clock=clock, dedup_s=3600)
    await meter.commit(_usage("old"))
    clock.advance(7200)
    await meter.commit(_usage("new"))
    assert not await redis.hexists("mm:{acme}:done", "old")
    assert await redis.hexists("mm:{acme}:done", "new")


async def test_a_window_of_zero_token_rejections_sliding_out_does_not_fail_commits(meter: Meter, clock) -> None:
    """Regression (chaos benchmark): HINCRBY by "-0" failed every commit that slid such a window out, so requests
    that completed while the window held only rejections (refused during an outage) went unbilled."""
    for rid in ("rejected-1", "rejected-2"):
        await meter.reserve("acme", rid, "m", 10, 20)
        await meter.commit(_usage(rid, prompt_tokens=0, completion_tokens=0, finish_reason="rejected"))
    clock.advance(61)  # both leave the 60 s token window with 0 tokens each
    await meter.reserve("acme", "served", "m", 10, 20)
    result = await meter.commit(_usage("served"))
    assert not result.duplicate and result.record.completion_tokens == 50
