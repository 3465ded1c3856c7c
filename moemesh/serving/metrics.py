"""Prometheus metrics: the HTTP endpoint every service exposes, and the RPC metrics the interceptors record.

Metrics live in prometheus_client's default registry under the `moemesh_` namespace. They are module-level objects,
created once per process, labelled by `service` so that several services started in one test process can share them.
Services define their own metrics the same way: `Counter("moemesh_<service>_<what>_total", ...)` at module level.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

NAMESPACE = "moemesh"

# Latency buckets from 1 ms (a health check) to 10 min (a long generation stream).
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

RPC_STARTED = Counter(
    "rpc_server_started", "RPCs started by the server.", ["service", "method"], namespace=NAMESPACE
)
RPC_HANDLED = Counter(
    "rpc_server_handled", "RPCs completed by the server, by status code.", ["service", "method", "code"],
    namespace=NAMESPACE,
)
RPC_SECONDS = Histogram(
    "rpc_server_handling_seconds", "Time from the start of an RPC to its status.", ["service", "method"],
    namespace=NAMESPACE, buckets=_RPC_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("rpc_server_in_flight", "RPCs being handled now.", ["service"], namespace=NAMESPACE)
SERVICE_UP = Gauge("service_serving", "1 while the service is SERVING, 0 while draining.", ["service"],
                   namespace=NAMESPACE)


def start_metrics_server(port: int, host: str = "127.0.0.1"):
    """Serves /metrics over HTTP on host:port (0: a free port) on a daemon thread; returns (server, bound port).
    `server.shutdown()` stops it."""
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
