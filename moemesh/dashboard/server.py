"""The dashboard's HTTP server (stdlib, one thread per request): the page and its vendored uPlot, the JSON the charts
poll, Prometheus HTTP service discovery of the mesh's /metrics endpoints (`/sd`), and `/metrics` with the tenants'
month spend and budgets (metering keeps those in Redis, not in counters; the 80%-of-budget alert needs them).

Local only by default. Bound to any other interface it needs an admin key: `Authorization: Bearer <key>`, or
`?key=<key>` once (the page then keeps it in a cookie)."""

from __future__ import annotations

import hmac
import json
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from moemesh.dashboard.collector import Collector
from moemesh.dashboard.scrape import targets

STATIC = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript", "dashboard.css": "text/css",
          "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css", "uPlot.LICENSE": "text/plain"}
COOKIE = "moemesh_dashboard_key"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def needs_key(host: str) -> bool:
    return host not in LOOPBACK


class _AccountGauges:
    """moemesh_tenant_budget_usd / moemesh_tenant_month_spent_usd{tenant}: metering's view, re-read every 5 s."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self):
        budget = GaugeMetricFamily("moemesh_tenant_budget_usd", "Monthly budget of a tenant (0: unlimited).",
                                   labels=["tenant"])
        spent = GaugeMetricFamily("moemesh_tenant_month_spent_usd", "Dollars a tenant committed this month (UTC).",
                                  labels=["tenant"])
        for tenant, account in sorted(self.collector.history.accounts.items()):
            budget.add_metric([tenant], account["budget_usd"])
            spent.add_metric([tenant], account["month_spent_usd"])
        yield budget
        yield spent


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], collector: Collector, key: str | None) -> None:
        super().__init__(address, _Handler)
        self.collector, self.key = collector, key
        self.registry = CollectorRegistry()
        self.registry.register(_AccountGauges(collector))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="dashboard-http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - one line per poll would flood the supervisor's log
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if not self._authorized(query):
            return self._send(HTTPStatus.UNAUTHORIZED, b"admin key required (Authorization: Bearer <key>)\n",
                              "text/plain")
        path = url.path.rstrip("/") or "/index.html"
        routes = {"/api/points": lambda: self._json({"points": self.server.collector.history.points_since(
                      float(query.get("since", ["0"])[0]))}),
                  "/api/totals": lambda: self._json({**self.server.collector.history.totals(),
                                                     "error": self.server.collector.last_error}),
                  "/sd": self._service_discovery, "/metrics": self._metrics}
        if path in routes:
            return routes[path]()
        name = path.removeprefix("/static/").removeprefix("/")
        if name in STATIC:
            body = resources.files("moemesh.dashboard").joinpath("static", name).read_bytes()
            return self._send(HTTPStatus.OK, body, STATIC[name], cookie=query.get("key", [None])[0])
        self._send(HTTPStatus.NOT_FOUND, f"no such page: {url.path}\n".encode(), "text/plain")

    def _authorized(self, query: dict) -> bool:
        key = self.server.key
        if not key:
            return True
        offered = [query.get("key", [""])[0], self.headers.get("Authorization", "").removeprefix("Bearer ").strip()]
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                offered.append(value)
        return any(o and hmac.compare_digest(o.encode(), key.encode()) for o in offered)

    def _service_discovery(self) -> None:
        """Prometheus http_sd_configs: one target group per service, labelled service=<name>."""
        jobs = targets(self.server.collector.status())
        host, port = self.server.server_address[:2]
        jobs["dashboard"] = f"{host}:{port}"
        self._json([{"targets": [address], "labels": {"service": job}} for job, address in sorted(jobs.items())])

    def _metrics(self) -> None:
        self._send(HTTPStatus.OK, generate_latest(self.server.registry), "text/plain; version=0.0.4")

    def _json(self, value) -> None:
        self._send(HTTPStatus.OK, json.dumps(value, allow_nan=False).encode(), "application/json")

    def _send(self, code: HTTPStatus, body: bytes, ctype: str, cookie: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if cookie and self.server.key:
            self.send_header("Set-Cookie", f"{COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/")
        self.end_headers()
        self.wfile.write(body)
