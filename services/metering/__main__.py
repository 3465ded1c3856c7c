"""`python -m services.metering` / `moemesh-metering`: the metering service process.

The embedded redis-server (no REDIS_URL) is started here, on the main thread, before the event loop: it gets
PR_SET_PDEATHSIG from this thread, so it dies with the process even on SIGKILL (see redis_server.py), and it is
stopped after the gRPC server has drained and the client is closed, so every acknowledged commit is in its AOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from moemesh.serving import run_service
from services.metering import metrics
from services.metering.bootstrap import ensure_dev_tenant
from services.metering.config import MeteringConfig
from services.metering.connection import make_client, open_for_service
from services.metering.feedback import FeedbackStore
from services.metering.meter import Meter
from services.metering.admin import load_or_create_admin_token
from services.metering.sealing import TextSealer
from services.metering.secret import load_or_create_secret
from services.metering.servicer import MeteringServicer, add_to_server
from services.metering.tenants import TenantStore

log = logging.getLogger("services.metering")


async def sweep_forever(meter: Meter, interval_s: float) -> None:
    """Refunds expired reservations every interval (the scripts also do it lazily; this makes it prompt)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            expired = await meter.sweep()
        except Exception as exc:  # Redis down for a moment: try again next round
            log.warning("sweep failed: %s", exc)
            continue
        if expired:
            metrics.EXPIRED.inc(expired)
            log.info("refunded %d expired reservations", expired)


def main(argv: list[str] | None = None) -> int:
    config = MeteringConfig.load(argv)
    try:
        target = open_for_service(config.redis_url or None, Path(config.redis_dir) if config.redis_dir else None)
    except (RuntimeError, OSError) as exc:
        print(f"moemesh-metering: cannot start Redis: {exc}", file=sys.stderr)
        return 1
    held: dict = {}

    async def register(server):
        client = make_client(target.url, max_connections=config.redis_max_connections)
        held["client"] = client
        await client.ping()
        secret = load_or_create_secret(Path(config.secret_file) if config.secret_file else None)
        tenants = TenantStore(client, secret)
        sealer = TextSealer.load(config.text_keys_file or None)  # a bad key file stops the start, naming it
        meter = Meter(client, config.price_table(), config.hardware_table(), default_hardware=config.hardware,
                      default_devices=config.devices, reservation_ttl_s=config.reservation_ttl_s,
                      dedup_s=config.dedup_days * 86400)
        if config.dev_tenant:
            await ensure_dev_tenant(tenants, config.dev_tenant)
            log.info("dev tenant %r ready; its key is in MOEMESH_HOME/run/dev_api_key", config.dev_tenant)
        if config.sweep_interval_s > 0:
            held["sweeper"] = asyncio.create_task(sweep_forever(meter, config.sweep_interval_s))
        log.info("redis at %s", target.url)
        return add_to_server(MeteringServicer(meter, tenants, FeedbackStore(client, sealer=sealer),
                                                admin_token=load_or_create_admin_token()), server)

    async def on_stop() -> None:
        if "sweeper" in held:
            held["sweeper"].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held["sweeper"]
        if "client" in held:
            await held["client"].aclose()

    try:
        return run_service(config, register, name="metering", on_stop=on_stop)
    finally:
        target.close()


if __name__ == "__main__":
    from moemesh.serving.server import exit_now  # no ~2 s torch teardown: `moemesh up` stops all within 10 s

    exit_now(main())
