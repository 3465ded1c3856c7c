"""Tenants and API keys against a real Redis; the HMAC secret file; the dev bootstrap; the price tables."""

from __future__ import annotations

import json
import stat

import pytest

from services.metering.bootstrap import ensure_dev_tenant
from services.metering.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from services.metering.pricing import HardwareTable, PriceTable, PricingError
from services.metering.secret import load_or_create_secret
from services.metering.tenants import Limits, TenantStore

from .conftest import SECRET


async def _everything_in_redis(redis) -> str:
    dump = []
    async for key in redis.scan_iter("*"):
        kind = await redis.type(key)
        value = {"hash": redis.hgetall, "set": redis.smembers, "string": redis.get}.get(kind)
        dump.append(f"{key} {await value(key) if value else ''}")
    return "\n".join(dump)


async def test_keys_are_stored_only_as_keyed_hashes(redis) -> None:
    store = TenantStore(redis, SECRET)
    tenant, key = await store.create("acme", namespace="team-a", limits=Limits(rpm=5), weight=2.0, priority=1)
    assert key.startswith("mm-") and len(key) > 40
    assert (tenant.namespace, tenant.limits.rpm, tenant.weight, tenant.priority) == ("team-a", 5, 2.0, 1)
    dump = await _everything_in_redis(redis)
    assert key not in dump and key[3:20] not in dump
    who = await store.authenticate(key)
    assert (who.tenant, who.namespace, who.weight, who.priority) == ("acme", "team-a", 2.0, 1)
    with pytest.raises(Unauthenticated):  # the same key under another server secret does not authenticate
        await TenantStore(redis, b"another-secret-of-32-bytes-length!!").authenticate(key)


async def test_several_keys_revoke_and_rotate(redis) -> None:
    store = TenantStore(redis, SECRET)
    _, k1 = await store.create("acme")
    k2_id, k2 = await store.add_key("acme")
    assert (await store.authenticate(k2)).key_id == k2_id
    await store.revoke_key("acme", k2_id)
    with pytest.raises(Unauthenticated):
        await store.authenticate(k2)
    assert (await store.authenticate(k1)).tenant == "acme"
    k3_id, k3, revoked = await store.rotate_key("acme")
    assert len(revoked) == 1 and revoked[0] != k3_id
    with pytest.raises(Unauthenticated):
        await store.authenticate(k1)
    assert (await store.authenticate(k3)).key_id == k3_id
    keys = await store.keys("acme")
    # by id: keys made within one millisecond have no creation order (keys() then sorts them by id)
    assert {k.key_id: bool(k.revoked_ms) for k in keys} == {revoked[0]: True, k2_id: True, k3_id: False}
    with pytest.raises(NotFound):
        await store.revoke_key("acme", "key_nope")


async def test_create_validates_and_refuses_duplicates(redis) -> None:
    store = TenantStore(redis, SECRET)
    await store.create("acme")
    with pytest.raises(AlreadyExists):
        await store.create("acme")
    with pytest.raises(InvalidArgument, match="rpm: -1"):
        await store.create("b", limits=Limits(rpm=-1))
    with pytest.raises(InvalidArgument, match="budget_usd"):
        await store.set_quota("acme", budget_usd=float("inf"))
    with pytest.raises(InvalidArgument, match="namespace"):
        await store.create("c", namespace="Bad NS")
    with pytest.raises(Unauthenticated):
        await store.authenticate("not-a-key")
    assert [t.name for t in await store.list()] == ["acme"]


async def test_set_quota_changes_only_what_is_given(redis) -> None:
    store = TenantStore(redis, SECRET)
    await store.create("acme", limits=Limits(rpm=1, tpm=2, concurrency=3, budget_usd=4.5))
    t = await store.set_quota("acme", tpm=20, budget_usd=0)
    assert t.limits == Limits(rpm=1, tpm=20, concurrency=3, budget_usd=0.0)


async def test_dev_tenant_key_file_is_reused_and_renewed(redis, tmp_path) -> None:
    store = TenantStore(redis, SECRET)
    key_file = tmp_path / "run" / "dev_api_key"
    key = await ensure_dev_tenant(store, "default", key_file)
    assert key_file.read_text().strip() == key and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert await ensure_dev_tenant(store, "default", key_file) == key
    await store.rotate_key("default")  # the file's key is now revoked
    renewed = await ensure_dev_tenant(store, "default", key_file)
    assert renewed != key and (await store.authenticate(renewed)).tenant == "default"


def test_secret_file_is_created_once_with_mode_0600(tmp_path) -> None:
    path = tmp_path / "secrets" / "hmac"
    first = load_or_create_secret(path, env={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert load_or_create_secret(path, env={}) == first
    assert load_or_create_secret(path, env={"MOEMESH_METERING_SECRET": "x" * 40}) == b"x" * 40
    with pytest.raises(ValueError, match="too short"):
        load_or_create_secret(path, env={"MOEMESH_METERING_SECRET": "short"})


def test_price_and_hardware_tables(tmp_path) -> None:
    assert PriceTable().price_nano("any", 1000, 1000) == 2_000_000  # $0.002
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"big": {"input_per_1k": 0.5, "output_per_1k": 1.5}}}))
    table = PriceTable.load(path)
    assert table.price_nano("big", 2000, 1000) == 2_500_000_000 and table.price_nano("small", 1000, 0) == 1_000_000
    hw = HardwareTable()
    assert hw.cost_pico("h100:spot", 8, 3600) == round(8 * 1.49 * 1e12)
    assert hw.cost_pico("cpu:shared", 4, 1800) == round(4 * 0.0425 * 0.5 * 1e12)
    path.write_text(json.dumps({"models": {"big": {"input_per_1k": -1}}}))
    with pytest.raises(PricingError, match="models.big.input_per_1k"):
        PriceTable.load(path)
    with pytest.raises(PricingError, match="class one of"):
        HardwareTable.from_mapping({"h100:ondemand": {"unit": "gpu", "usd_per_hour": 1}})
    with pytest.raises(PricingError, match="not valid JSON"):
        path.write_text("{")
        PriceTable.load(path)


def test_cached_prompt_tokens_pay_the_discounted_input_price():
    table = PriceTable()  # $0.001 per 1k in and out; cached tokens at a quarter of it by default
    assert table.price_nano("any", 1000, 0, cached_tokens=800) == 200_000 + 200_000
    half = PriceTable.from_mapping({"cached_discount": 0.5})
    assert half.price_nano("any", 1000, 0, cached_tokens=1000) == 500_000
    with pytest.raises(PricingError, match="cached_discount: 1.5"):
        PriceTable.from_mapping({"cached_discount": 1.5})
