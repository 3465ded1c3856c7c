"""`moemesh usage --tenant T [--since …] [--until …] [--csv | --json [--records]] [--plot out.png]`: what a tenant
used, what it was charged, what it cost us (cost of goods), the margin, and its feedback, from the usage ledger in
the mesh's Redis (`--redis-url` / REDIS_URL, else MOEMESH_HOME's embedded server).

Default output is a table per model with a total line. `--json` prints the totals (requests, prompt_tokens,
cached_tokens (prompt tokens served from the prefix cache, billed at the cached rate), completion_tokens, price_usd, cost_usd, margin_usd, satisfaction, ... and by_model); with `--records` also every
ledger record. `--csv` prints one row per request (the ledger export). `--plot` draws tokens and dollars per hour
to a PNG. Times: Unix seconds, ISO dates/times (UTC unless they carry an offset), or "now-<N>{m,h,d}".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime, timezone

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.metering.report import Report
# Redis, metering and the plot are imported where they are used: `moemesh usage --help` stays fast
# (benchmarks/cli_startup.py).

_RELATIVE = re.compile(r"^now(?:-(\d+(?:\.\d+)?)([mhd]))?$")


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from '1767225600', '2026-01-01', '2026-01-01T12:30', '2026-01-01T12:30+02:00', 'now-24h'."""
    now = time.time() if now is None else now
    s = text.strip()
    m = _RELATIVE.match(s)
    if m:
        return now - (float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)] if m.group(1) else 0)
    try:
        return float(s)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{text!r} is not a time (Unix seconds, ISO date/time, or now-<N>m/h/d)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def register(subparsers) -> None:
    p = subparsers.add_parser("usage", help="a tenant's usage, price, cost of goods, margin and satisfaction",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenant", required=True)
    p.add_argument("--since", default=None, help="start of the period (inclusive; default: the beginning)")
    p.add_argument("--until", default=None, help="end of the period (exclusive; default: now)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="one CSV row per request")
    out.add_argument("--json", action="store_true", help="JSON totals")
    p.add_argument("--records", action="store_true", help="with --json: include every ledger record")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw tokens and dollars per hour to this PNG")
    p.add_argument("--redis-url", default=None, help="Redis of the mesh (default: REDIS_URL, else MOEMESH_HOME's)")
    p.set_defaults(func=run)


def _when(t: float | None) -> str:
    return "now" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(report: Report) -> None:
    since = "the beginning" if not report.since_s else _when(report.since_s)
    print(f"tenant {report.tenant}, {since} .. {_when(report.until_s)} (UTC)")
    head = (f"{'model':24} {'requests':>8} {'prompt':>9} {'cached':>9} {'completion':>10} {'price $':>11} "
            f"{'cost $':>11} {'margin $':>11} {'margin':>7} {'satisf.':>7} {'done':>5}")
    print(head)
    print("-" * len(head))
    rows = [(m, t.as_dict()) for m, t in sorted(report.by_model.items())] + [("TOTAL", report.totals.as_dict())]
    for i, (name, d) in enumerate(rows):
        if i == len(rows) - 1:
            print("-" * len(head))
        print(f"{name[:24]:24} {d['requests']:>8} {d['prompt_tokens']:>9} {d['cached_tokens']:>9} "
              f"{d['completion_tokens']:>10} "
              f"{d['price_usd']:>11.6f} {d['cost_usd']:>11.6f} {d['margin_usd']:>11.6f} "
              f"{_opt(d['margin_pct'], '.1f') + '%' if d['margin_pct'] is not None else '-':>7} "
              f"{_opt(d['satisfaction'], '.2f'):>7} "
              f"{_opt(None if d['task_completion_rate'] is None else 100 * d['task_completion_rate'], '.0f'):>4}"
              f"{'%' if d['task_completion_rate'] is not None else ' '}")


async def _report(ns: argparse.Namespace, client, since: float, until: float | None) -> Report:
    from services.metering.report import build_report
    from services.metering.tenants import require_tenant

    await require_tenant(client, ns.tenant)
    return await build_report(client, ns.tenant, since, until, with_rows=ns.csv or ns.records)


def run(ns: argparse.Namespace) -> int:
    import redis.exceptions

    from services.metering.connection import run_on_redis
    from services.metering.errors import MeteringError
    from services.metering.plot import draw_usage_png
    from services.metering.report import rows_csv

    try:
        since = parse_time(ns.since) if ns.since else 0.0
        until = parse_time(ns.until) if ns.until else None
        report = run_on_redis(lambda client: _report(ns, client, since, until), ns.redis_url)
    except (MeteringError, ValueError, RuntimeError, redis.exceptions.RedisError) as exc:
        print(f"moemesh usage: {exc}", file=sys.stderr)
        return 1
    if ns.csv:
        sys.stdout.write(rows_csv(report.rows))
    elif ns.json:
        out = report.as_dict()
        if ns.records:
            out["records"] = report.rows
        print(json.dumps(out, indent=1))
    else:
        print_table(report)
    if ns.plot:
        sys.stdout.flush()
        buckets = draw_usage_png(report, ns.plot)
        print(f"wrote {ns.plot} ({buckets} buckets)", file=sys.stderr)
    return 0
