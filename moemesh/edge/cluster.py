"""The upstream cluster of gateway replicas: HTTP/2 (gRPC), actively health-checked with grpc.health.v1 on the
moemesh.v1.Chat service, least-request balanced, no panic routing (no healthy replica: a clean 503 at once), and
optionally mTLS (the edge presents its certificate and verifies the gateway's against the development CA)."""

from __future__ import annotations

import ipaddress

from moemesh.edge.settings import EdgeSettings, UpstreamTls

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _endpoint(address: str) -> dict:
    host, _, port = address.rpartition(":")
    return {"endpoint": {"address": {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}}}


def _upstream_tls(tls: UpstreamTls) -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"{_TLS}.UpstreamTlsContext", "sni": tls.server_name,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}],
            "validation_context": {
                "trusted_ca": {"filename": tls.ca},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.server_name}}]},
        }}}


def gateway_cluster(s: EdgeSettings, name: str) -> dict:
    all_ips = all(_is_ip(a.rpartition(":")[0]) for a in s.gateways)
    interval = f"{s.health_interval_s:g}s"
    cluster = {
        "name": name, "type": "STATIC" if all_ips else "STRICT_DNS", "lb_policy": "LEAST_REQUEST",
        "connect_timeout": "2s", "per_connection_buffer_limit_bytes": s.max_body_bytes,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [_endpoint(a) for a in s.gateways]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "initial_stream_window_size": 1 << 20, "initial_connection_window_size": 2 << 20}}}},
        "health_checks": [{
            "timeout": "1s", "interval": interval, "no_traffic_interval": interval, "unhealthy_threshold": 2,
            "healthy_threshold": 1, "grpc_health_check": {"service_name": "moemesh.v1.Chat"},
            "always_log_health_check_failures": True}],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "circuit_breakers": {"thresholds": [{"max_connections": 1024, "max_pending_requests": 1024,
                                             "max_requests": 4096, "max_retries": 16}]},
    }
    if not all_ips:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if s.upstream_tls is not None:
        cluster["transport_socket"] = _upstream_tls(s.upstream_tls)
    return cluster
