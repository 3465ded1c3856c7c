"""Tenant text at rest: feedback comments reach a real Redis only sealed (AES-256-GCM); a scan of every key and value
finds no plaintext; a sealed value moved to another tenant's slot does not open; key rotation with reseal."""

from __future__ import annotations

import json

import pytest
from cryptography.exceptions import InvalidTag

from services.metering.feedback import Feedback, FeedbackStore
from services.metering.keys import TenantKeys
from services.metering.meter import Meter
from services.metering.sealing import SealError, TextSealer
from services.metering.ledger import Usage
from services.metering.tenants import TenantStore

from .conftest import SECRET

SECRET_TEXT = "my-secret-roadmap: launch Zephyr in March"


@pytest.fixture
async def meter(redis, clock) -> Meter:
    await TenantStore(redis, SECRET, clock).create("acme")
    return Meter(redis, clock=clock)


async def dump_everything(redis) -> bytes:
    """Every key and every value in the database, raw (what a backup or a replica would hold)."""
    out = []
    async for key in redis.scan_iter("*"):
        out.append(key)
        kind = await redis.type(key)
        if kind == "hash":
            out += [f"{k}={v}" for k, v in (await redis.hgetall(key)).items()]
        elif kind == "string":
            out.append(await redis.get(key))
        elif kind == "stream":
            out += [json.dumps(f) for _, f in await redis.xrange(key)]
        elif kind == "zset":
            out += await redis.zrange(key, 0, -1)
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
    return "\n".join(map(str, out)).encode()


async def test_comments_are_sealed_in_redis_and_open_for_their_tenant(meter, redis, clock, tmp_path):
    await meter.commit(Usage("r1", "acme", prompt_tokens=5, completion_tokens=3, finish_reason="stop"))
    store = FeedbackStore(redis, clock, sealer=TextSealer.load(tmp_path / "keys"))
    await store.give("acme", Feedback("r1", rating=2, comment=SECRET_TEXT))
    raw = await dump_everything(redis)
    assert b"Zephyr" not in raw and b"aesgcm:k1:" in raw
    assert (await store.get_many("acme", ["r1"]))["r1"].comment == SECRET_TEXT
    # copied into another tenant's slot, the ciphertext does not open there
    await redis.hset(TenantKeys("other").feedback, "r1", await redis.hget(TenantKeys("acme").feedback, "r1"))
    with pytest.raises(InvalidTag):
        await store.get_many("other", ["r1"])


async def test_rotation_reseals_under_the_new_key(meter, redis, clock, tmp_path):
    await meter.commit(Usage("r1", "acme", prompt_tokens=5, completion_tokens=3, finish_reason="stop"))
    keys = tmp_path / "keys"
    await FeedbackStore(redis, clock, sealer=TextSealer.load(keys)).give("acme", Feedback("r1", 4, comment="fine"))
    old_line = keys.read_text()
    keys.write_text("k2 " + "ab" * 32 + "\n" + old_line)  # the new key goes first
    rotated = FeedbackStore(redis, clock, sealer=TextSealer.load(keys))
    assert await rotated.reseal("acme") == 1 and await rotated.reseal("acme") == 0
    keys.write_text("k2 " + "ab" * 32 + "\n")  # the old key retired
    only_new = FeedbackStore(redis, clock, sealer=TextSealer.load(keys))
    assert (await only_new.get_many("acme", ["r1"]))["r1"].comment == "fine"


def test_key_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "keys"
    bad.write_text("k1 not-hex\n")
    with pytest.raises(SealError, match=r"keys:1: expected"):
        TextSealer.load(bad)
    created = TextSealer.load(tmp_path / "fresh")
    assert created.current == "k1" and oct((tmp_path / "fresh").stat().st_mode & 0o777) == "0o600"
