"""The whole Envoy bootstrap of the edge, rendered from EdgeSettings: admin on loopback, one TLS listener (TLS 1.3
only, ALPN h2 and http/1.1) running the connection manager of http.py, the gateway cluster of cluster.py, and a cap
on downstream connections. `render` returns the bootstrap as a dict; `write` stores it as JSON (Envoy reads JSON or
YAML by the file's extension).
"""

from __future__ import annotations

import json
from pathlib import Path

from moemesh.edge.cluster import gateway_cluster
from moemesh.edge.http import GATEWAY_CLUSTER, connection_manager
from moemesh.edge.settings import EdgeSettings

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def downstream_tls(s: EdgeSettings) -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"{_TLS}.DownstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": s.cert}, "private_key": {"filename": s.key}}],
        }}}


def listener(s: EdgeSettings, descriptor: str) -> dict:
    return {
        "name": "edge_https",
        "address": {"socket_address": {"address": s.listen_host, "port_value": s.listen_port}},
        "per_connection_buffer_limit_bytes": s.max_body_bytes,
        "filter_chains": [{
            "transport_socket": downstream_tls(s),
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": connection_manager(s, descriptor)}],
        }],
    }


def render(s: EdgeSettings) -> dict:
    return {
        "node": {"id": "moemesh-edge", "cluster": "moemesh-edge"},
        "admin": {"address": {"socket_address": {"address": s.admin_host, "port_value": s.admin_port}}},
        "static_resources": {"listeners": [listener(s, s.descriptor)],
                             "clusters": [gateway_cluster(s, GATEWAY_CLUSTER)]},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                         "DownstreamConnectionsConfig",
                "max_active_downstream_connections": s.max_connections}}]},
    }


def write(s: EdgeSettings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(render(s), indent=1))
    return path
