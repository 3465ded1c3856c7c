"""`moemesh top`: a live terminal view of the running mesh, refreshed every second: QPS, errors, TTFT / inter-token /
end-to-end latency quantiles, tokens per second, batch, queue, KV cache and router busy (tier 1), and each tenant's
requests, tokens, price, cost of goods, margin and month spend against its budget. Ctrl-C quits.

It scrapes the services' /metrics listed in the status file itself (no dashboard needed); rates and quantiles cover
the last 10 s. Imports neither torch nor the services: a client command starts in a fraction of a second."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CLEAR = "\x1b[H\x1b[2J"  # cursor home + clear screen: redraw in place, as top does


def register(subparsers) -> None:
    p = subparsers.add_parser("top", help="live terminal view of the mesh's health and tenants' spend",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--status-file", type=Path, default=None, help="default MOEMESH_HOME/run/status.json")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--iterations", type=int, default=0, help="stop after this many screens (default: until Ctrl-C)")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from moemesh.dashboard.collector import Collector
    from moemesh.dashboard.top_view import render
    from moemesh.serving import status as status_file

    path = ns.status_file or status_file.default_path()
    if status_file.read(path) is None:
        print(f"moemesh top: no running mesh (no live status file at {path}); start one with `moemesh up`",
              file=sys.stderr)
        return 1
    if ns.interval <= 0:
        print(f"moemesh top: --interval {ns.interval} must be > 0", file=sys.stderr)
        return 2
    collector = Collector(path, period_s=ns.interval, accounts_every_s=5.0)
    tty = sys.stdout.isatty()
    shown = 0
    while not ns.iterations or shown < ns.iterations:
        started = time.monotonic()
        point = collector.tick()
        screen = render(point, collector.history.totals(), str(path))
        sys.stdout.write((CLEAR if tty else "") + screen + ("" if tty else "\n"))
        sys.stdout.flush()
        shown += 1
        if not ns.iterations or shown < ns.iterations:
            time.sleep(max(0.0, ns.interval - (time.monotonic() - started)))
    return 0
