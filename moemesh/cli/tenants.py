"""`moemesh tenants create|list|show|add-key|rotate-key|revoke-key|set-quota`: tenant administration on the mesh's
Redis (the same one metering uses: `--redis-url` / REDIS_URL, else the running mesh's embedded server in
MOEMESH_HOME/redis, else one started for the command). Changes act at once on a running mesh: metering reads limits
from Redis on every Reserve. API keys are printed once, at creation; Redis keeps only their HMAC.

    moemesh tenants create acme --rpm 60 --tpm 20000 --concurrency 4 --budget-usd 25 --json
    moemesh tenants set-quota acme --budget-usd 50
"""

from __future__ import annotations

import argparse
import json
import sys

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.metering.meter import Meter
    from services.metering.tenants import Tenant
# Redis and metering are imported where they are used: `moemesh tenants --help` stays fast (benchmarks/cli_startup.py).


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--redis-url", default=None, help="Redis of the mesh (default: REDIS_URL, else MOEMESH_HOME's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, default=None, help="requests per minute (0: unlimited)")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute (0: unlimited)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (0: unlimited)")
    p.add_argument("--budget-usd", type=float, default=None, help="dollars per calendar month, UTC (0: unlimited)")
    p.add_argument("--weight", type=float, default=None, help="fair-queuing weight (> 0)")
    p.add_argument("--priority", type=int, default=None, help="default priority class")


def register(subparsers) -> None:
    parser = subparsers.add_parser("tenants", help="create and manage tenants, API keys and quotas",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common()
    p = sub.add_parser("create", parents=[common], help="create a tenant and its first API key")
    p.add_argument("name")
    p.add_argument("--namespace", default="", help="isolation namespace (default: the name)")
    _limit_flags(p)
    sub.add_parser("list", parents=[common], help="list tenants")
    for action, text in (("show", "a tenant's settings, keys and month so far"),
                         ("add-key", "issue one more API key"),
                         ("rotate-key", "issue a new API key and revoke all others")):
        sub.add_parser(action, parents=[common], help=text).add_argument("name")
    p = sub.add_parser("revoke-key", parents=[common], help="revoke one API key at once")
    p.add_argument("name")
    p.add_argument("key_id")
    p = sub.add_parser("set-quota", parents=[common], help="change limits (acts at once on a running mesh)")
    p.add_argument("name")
    _limit_flags(p)
    parser.set_defaults(func=run)


def _fmt_limit(v: float, money: bool = False) -> str:
    return "-" if not v else (f"${v:,.2f}" if money else str(v))


def _print_tenants(tenants: list[dict]) -> None:
    print(f"{'tenant':20} {'namespace':16} {'rpm':>7} {'tpm':>9} {'conc':>5} {'budget/mo':>11} {'spent/mo':>11}")
    for t in tenants:
        print(f"{t['tenant']:20} {t['namespace']:16} {_fmt_limit(t['rpm']):>7} {_fmt_limit(t['tpm']):>9} "
              f"{_fmt_limit(t['concurrency']):>5} {_fmt_limit(t['budget_usd'], True):>11} "
              f"${t.get('month_spent_usd', 0):>10,.4f}")


async def _with_month(meter: Meter, t: Tenant) -> dict:
    spent, held = await meter.month_totals(t.name)
    return {**t.as_dict(), "month_spent_usd": spent, "month_held_usd": held}


async def _act(ns: argparse.Namespace, client) -> dict:
    from services.metering.meter import Meter
    from services.metering.secret import load_or_create_secret
    from services.metering.tenants import Limits, TenantStore

    store = TenantStore(client, load_or_create_secret())
    meter = Meter(client)
    limits = {k: getattr(ns, k, None) for k in ("rpm", "tpm", "concurrency", "budget_usd")}
    if ns.action == "create":
        full = Limits(**{k: v or 0 for k, v in limits.items()})
        tenant, key = await store.create(ns.name, ns.namespace, full, ns.weight or 1.0, ns.priority or 0)
        key_id = (await store.keys(ns.name))[0].key_id
        return {**tenant.as_dict(), "api_key": key, "key_id": key_id}
    if ns.action == "list":
        return {"tenants": [await _with_month(meter, t) for t in await store.list()]}
    if ns.action == "add-key":
        key_id, key = await store.add_key(ns.name)
        return {"tenant": ns.name, "api_key": key, "key_id": key_id}
    if ns.action == "rotate-key":
        key_id, key, revoked = await store.rotate_key(ns.name)
        return {"tenant": ns.name, "api_key": key, "key_id": key_id, "revoked_key_ids": revoked}
    if ns.action == "revoke-key":
        await store.revoke_key(ns.name, ns.key_id)
        return {"tenant": ns.name, "revoked_key_id": ns.key_id}
    if ns.action == "set-quota":
        await store.set_quota(ns.name, weight=ns.weight, priority=ns.priority, **limits)
    info = await _with_month(meter, await store.get(ns.name))  # show, set-quota
    info["keys"] = [{"key_id": k.key_id, "created_unix": k.created_ms / 1000,
                     "revoked_unix": k.revoked_ms / 1000 if k.revoked_ms else None} for k in await store.keys(ns.name)]
    return info


def _print_human(action: str, out: dict) -> None:
    if action == "list":
        _print_tenants(out["tenants"])
        return
    if "api_key" in out:
        print(f"tenant {out['tenant']}: new key {out['key_id']}")
        print(f"API key (shown only now; store it): {out['api_key']}")
        for old in out.get("revoked_key_ids", []):
            print(f"revoked key {old}")
        return
    if action == "revoke-key":
        print(f"tenant {out['tenant']}: key {out['revoked_key_id']} revoked")
        return
    _print_tenants([out])
    print(f"weight {out['weight']}, priority {out['priority']}, held by in-flight requests "
          f"${out['month_held_usd']:.6f}")
    for k in out["keys"]:
        state = "revoked" if k["revoked_unix"] else "live"
        print(f"  key {k['key_id']}  {state}")


def run(ns: argparse.Namespace) -> int:
    import redis.exceptions

    from services.metering.connection import run_on_redis
    from services.metering.errors import MeteringError

    try:
        out = run_on_redis(lambda client: _act(ns, client), ns.redis_url)
    except (MeteringError, ValueError, RuntimeError, redis.exceptions.RedisError) as exc:
        print(f"moemesh tenants {ns.action}: {exc}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(out, indent=1))
    else:
        _print_human(ns.action, out)
    return 0
