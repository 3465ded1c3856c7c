"""What `moemesh up` adds for the dashboard (called from moemesh/cli/up.py): the flags, the server started on threads
of the supervisor once the status file is written (it dies with the mesh, no process to supervise), and the status
file's `dashboard` URL (plus `dashboard_key` when it is exposed beyond loopback)."""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

DEFAULT_PORT = 8470


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_PORT,
                   help=f"port of the live monitoring dashboard (default {DEFAULT_PORT}; 0: any free port; "
                        "-1: no dashboard)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface of the dashboard (default 127.0.0.1: local only); any other needs the admin key "
                        "the status file holds as dashboard_key")


def start(ns: argparse.Namespace, status_path: Path, say) -> dict:
    """Starts the dashboard over the mesh of `status_path`; returns the status file's extra keys ({} when off)."""
    if ns.dashboard_port < 0:
        return {}
    from moemesh.dashboard.collector import Collector
    from moemesh.dashboard.server import DashboardServer, needs_key

    key = secrets.token_urlsafe(24) if needs_key(ns.dashboard_host) else None
    collector = Collector(status_path)
    try:
        server = DashboardServer((ns.dashboard_host, ns.dashboard_port), collector, key)
    except OSError as exc:  # the mesh still serves: monitoring is not worth refusing to start over
        say(f"  --  dashboard  {ns.dashboard_host}:{ns.dashboard_port} not started: {exc.strerror}; "
            "pick another with --dashboard-port")
        return {}
    collector.start()
    server.serve_in_thread()
    say(f"  ok  dashboard  {server.url}" + ("  (admin key: status file's dashboard_key)" if key else ""))
    return {"dashboard": server.url, **({"dashboard_key": key} if key else {})}
