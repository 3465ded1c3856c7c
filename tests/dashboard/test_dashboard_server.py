"""The dashboard's HTTP server on a real loopback socket over a History fed from exposition text: the page and its
vendored chart library, the JSON, Prometheus service discovery, the budget gauges, and the admin key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moemesh.dashboard.collector import Collector
from moemesh.dashboard.server import DashboardServer, needs_key

from mesh_text import mesh_snapshot

STATUS = {"gateway": "127.0.0.1:50051", "supervisor_metrics_port": 9000,
          "services": {"router": {"address": "127.0.0.1:7000", "metrics_port": 9001},
                       "tokenizer": {"address": "127.0.0.1:7002", "metrics_port": None}}}


@pytest.fixture
def serve():
    servers = []

    def start(key: str | None = None) -> DashboardServer:
        collector = Collector(Path("unused"), read_status=lambda path: STATUS)
        collector.history.add(mesh_snapshot(0, 100))
        collector.history.add(mesh_snapshot(10, 200))
        collector.history.accounts = {"acme": {"budget_usd": 10.0, "month_spent_usd": 8.5, "month_held_usd": 0}}
        server = DashboardServer(("127.0.0.1", 0), collector, key)
        server.serve_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_page_library_and_json_are_served_locally(serve) -> None:
    url = serve().url
    code, page, _ = get(url)
    assert code == 200 and b"/static/uPlot.iife.min.js" in page and b"https://" not in page  # no CDN
    code, lib, _ = get(url + "static/uPlot.iife.min.js")
    assert code == 200 and len(lib) > 40_000
    assert b"MIT" in get(url + "static/uPlot.LICENSE")[1]
    points = json.loads(get(url + "api/points?since=0")[1])["points"]
    assert points[-1]["qps"] == pytest.approx(10.0)
    totals = json.loads(get(url + "api/totals")[1])
    assert totals["tenants"][0]["tenant"] == "acme" and totals["experts"]["layers"] == [0, 1]
    assert get(url + "static/../server.py")[0] == 404


def test_service_discovery_and_budget_gauges_for_prometheus(serve) -> None:
    server = serve()
    groups = json.loads(get(server.url + "sd")[1])
    port = server.server_address[1]
    assert groups == [{"targets": [f"127.0.0.1:{port}"], "labels": {"service": "dashboard"}},
                      {"targets": ["127.0.0.1:9001"], "labels": {"service": "router"}},
                      {"targets": ["127.0.0.1:9000"], "labels": {"service": "supervisor"}}]
    metrics = get(server.url + "metrics")[1].decode()
    assert 'moemesh_tenant_budget_usd{tenant="acme"} 10.0' in metrics
    assert 'moemesh_tenant_month_spent_usd{tenant="acme"} 8.5' in metrics


def test_an_exposed_dashboard_wants_its_admin_key(serve) -> None:
    assert not needs_key("127.0.0.1") and needs_key("0.0.0.0")
    url = serve(key="s3cret").url
    assert get(url + "api/totals")[0] == 401 and get(url + "sd")[0] == 401
    assert get(url + "api/totals", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(url + "api/totals", {"Authorization": "Bearer s3cret"})[0] == 200
    code, _, headers = get(url + "?key=s3cret")  # the page once with ?key=: a cookie for its polls
    assert code == 200 and "moemesh_dashboard_key=s3cret" in headers["Set-Cookie"]
    assert get(url + "api/points", {"Cookie": "moemesh_dashboard_key=s3cret"})[0] == 200
