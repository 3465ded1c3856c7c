"""A ready-to-use tenant for local development, so that `make run` then `moemesh chat` just works.

For `moemesh up` (two ways, pick one):
1. Start metering with `--dev-tenant default` (env MOEMESH_METERING_DEV_TENANT=default). Before it reports ready
   (MOEMESH_READY_FILE), metering makes sure tenant "default" exists and writes a live API key of it to
   MOEMESH_HOME/run/dev_api_key (mode 0600; `dev_key_path()`). Read that file after the ready file appears and put
   its content into the status file as `api_key`.
2. Or call `dev_api_key("default")` (synchronous; no event loop running) from `moemesh up` itself: it reaches the
   mesh's Redis like `moemesh tenants` does (REDIS_URL, the running metering's socket, or an embedded server started
   for the call), does the same, and returns the key.

The key in the file is reused while it still authenticates; when it was revoked, or Redis was wiped, a new key is
issued and the file rewritten. The tenant is created without limits.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from services.metering.errors import AlreadyExists, Unauthenticated
from services.metering.tenants import TenantStore

DEV_TENANT = "default"


def dev_key_path() -> Path:
    from moemesh.home import subdir

    return subdir("run") / "dev_api_key"


async def ensure_dev_tenant(store: TenantStore, name: str = DEV_TENANT, key_file: Path | None = None) -> str:
    """Makes sure tenant `name` exists and `key_file` holds a live key of it; returns the key."""
    key_file = key_file or dev_key_path()
    with contextlib.suppress(OSError):
        key = key_file.read_text().strip()
        with contextlib.suppress(Unauthenticated):
            if (await store.authenticate(key)).tenant == name:
                return key
    try:
        _, key = await store.create(name)
    except AlreadyExists:
        _, key = await store.add_key(name)
    _write_private(key_file, key)
    return key


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    tmp.replace(path)


def dev_api_key(name: str = DEV_TENANT, redis_url: str | None = None) -> str:
    """Synchronous ensure_dev_tenant against the mesh's Redis (see the module docstring)."""
    from services.metering.connection import run_on_redis
    from services.metering.secret import load_or_create_secret

    secret = load_or_create_secret()
    return run_on_redis(lambda client: ensure_dev_tenant(TenantStore(client, secret), name), redis_url)
