"""How metering and the CLI reach the one Redis of a mesh.

- `REDIS_URL` (or an explicit url: redis://, rediss://, unix://) selects an external Redis; nothing is started.
- Otherwise the data directory is MOEMESH_HOME/redis. The metering service owns the embedded server there
  (`open_for_service`); a CLI command connects to that server's socket when it runs, else starts one for the
  duration of the command (`open_for_command`). Both see the same data, because it is the same directory.

Clients use a BlockingConnectionPool: redis-py's asyncio ConnectionPool raises once max_connections are in use
(FACTS.md), the blocking one waits up to `timeout` seconds for a free connection instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis

from services.metering.redis_server import EmbeddedRedis, RedisBusy, running_socket

log = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"
T = TypeVar("T")


def default_data_dir() -> Path:
    from moemesh.home import subdir

    return subdir("redis")


def make_client(url: str, *, max_connections: int = 64, timeout: float = 10.0) -> aioredis.Redis:
    """An asyncio client on a BlockingConnectionPool (decoded str replies). Create it inside the running loop."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, decode_responses=True
    )
    return aioredis.Redis(connection_pool=pool)


@dataclass
class RedisTarget:
    """A Redis URL, plus the embedded server this process started for it (None: someone else's or external)."""

    url: str
    server: EmbeddedRedis | None = None

    @classmethod
    def embedded(cls, server: EmbeddedRedis) -> "RedisTarget":
        return cls(server.url, server)

    def close(self) -> None:
        """Stops the server this process started (if any)."""
        if self.server is not None:
            self.server.stop()
            self.server = None


def _url(explicit: str | None) -> str | None:
    return explicit or os.environ.get(REDIS_URL_ENV) or None


def open_for_service(redis_url: str | None = None, data_dir: Path | None = None,
                     busy_wait_s: float = 15.0) -> RedisTarget:
    """Metering's Redis: external when a url is given (or REDIS_URL), else the embedded server, started here.

    A server held by a live CLI command is waited for (up to busy_wait_s); one held by another live metering
    process is an error: two owners of one data directory would stop it under each other.
    """
    url = _url(redis_url)
    if url:
        return RedisTarget(url)
    data_dir = data_dir or default_data_dir()
    deadline = time.monotonic() + busy_wait_s
    while True:
        try:
            return RedisTarget.embedded(EmbeddedRedis(data_dir).start())
        except RedisBusy as busy:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{busy}; stop that process or set {REDIS_URL_ENV} to share an external "
                                   "Redis between several metering replicas") from None
            log.info("%s; waiting", busy)
            time.sleep(0.2)


def open_for_command(redis_url: str | None = None, data_dir: Path | None = None) -> RedisTarget:
    """A CLI command's Redis: explicit url, REDIS_URL, a running mesh's embedded server, or one started for it."""
    url = _url(redis_url)
    if url:
        return RedisTarget(url)
    data_dir = data_dir or default_data_dir()
    sock = running_socket(data_dir)
    if sock is not None:
        return RedisTarget(f"unix://{sock}")
    try:
        return RedisTarget.embedded(EmbeddedRedis(data_dir).start())
    except RedisBusy as busy:  # started between our check and our start
        return RedisTarget(f"unix://{busy.socket_path}")



def run_on_redis(work: Callable[[aioredis.Redis], Awaitable[T]], redis_url: str | None = None,
                 data_dir: Path | None = None) -> T:
    """Runs `work(client)` in a fresh event loop against open_for_command's Redis, then cleans up (CLI helper)."""
    target = open_for_command(redis_url, data_dir)

    async def go() -> T:
        client = make_client(target.url, max_connections=4)
        try:
            return await work(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    finally:
        target.close()
