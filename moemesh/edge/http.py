"""The HTTP connection manager of the edge listener: its filters, error shapes and access log.

Filters, in request order:
    health_check (/healthz: 200 while a gateway replica is healthy, else 503; no key needed)
    -> local_ratelimit (token bucket per Envoy; 429 + retry-after, RESOURCE_EXHAUSTED for gRPC)
    -> lua (openai.lua: unknown fields -> 400, "stream": true -> the :stream path, OpenAI error shape, SSE [DONE])
    -> grpc_json_transcoder (HTTP/JSON <-> moemesh.v1.Chat; gRPC passes through)
    -> router
"""

from __future__ import annotations

from moemesh.edge import lua
from moemesh.edge.routes import route_config
from moemesh.edge.settings import EdgeSettings

CHAT_SERVICE = "moemesh.v1.Chat"
GATEWAY_CLUSTER = "gateway"
# 256 KiB x max_concurrent_streams (128) bounds header memory per connection at 32 MiB.
CODEC_HEADERS_KB = 256
EDGE_NAMESPACE = "moemesh.edge"  # dynamic metadata written by openai.lua
_T = "type.googleapis.com/envoy.extensions.filters"

# HTTP status -> (OpenAI error type, gRPC-style code) for errors Envoy raises itself (local replies).
LOCAL_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "NOT_FOUND"),
    408: ("invalid_request_error", "DEADLINE_EXCEEDED"),
    413: ("invalid_request_error", "REQUEST_TOO_LARGE"),
    415: ("invalid_request_error", "UNSUPPORTED_MEDIA_TYPE"),
    429: ("rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    431: ("invalid_request_error", "HEADERS_TOO_LARGE"),
    503: ("server_error", "UNAVAILABLE"),
    504: ("server_error", "DEADLINE_EXCEEDED"),
}

ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%", "request_id": "%REQ(X-REQUEST-ID)%", "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "rpc": "%REQ(:PATH)%", "protocol": "%PROTOCOL%",
    "tls": "%DOWNSTREAM_TLS_VERSION%", "status": "%RESPONSE_CODE%", "grpc_status": "%GRPC_STATUS%",
    "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%", "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_HOST%", "bytes_in": "%BYTES_RECEIVED%", "bytes_out": "%BYTES_SENT%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "user_agent": "%REQ(USER-AGENT)%",
}


def _not_grpc() -> dict:
    return {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"},
                                         "invert_match": True, "treat_missing_header_as_empty": True}}}


def _error_body(kind: str, code: str) -> dict:
    return {"content_type": "application/json", "json_format": {"error": {
        "message": "%LOCAL_REPLY_BODY%", "type": kind, "param": f"%DYNAMIC_METADATA({EDGE_NAMESPACE}:param)%",
        "code": code}}}


def _mapper(status_filter: dict, kind: str, code: str) -> dict:
    return {"filter": {"and_filter": {"filters": [{"status_code_filter": {"comparison": status_filter}},
                                                  _not_grpc()]}},
            "body_format_override": _error_body(kind, code)}


def local_reply_config() -> dict:
    """Envoy's own errors to HTTP clients in OpenAI's shape (gRPC clients keep grpc-status/grpc-message)."""
    def eq(status: int) -> dict:
        return {"op": "EQ", "value": {"default_value": status, "runtime_key": f"edge.reply.{status}"}}

    mappers = [_mapper(eq(status), kind, code) for status, (kind, code) in LOCAL_ERRORS.items()]
    ge = {"op": "GE", "value": {"default_value": 500, "runtime_key": "edge.reply.5xx"}}
    mappers.append(_mapper(ge, "server_error", "INTERNAL"))
    ge4 = {"op": "GE", "value": {"default_value": 400, "runtime_key": "edge.reply.4xx"}}
    mappers.append(_mapper(ge4, "invalid_request_error", "INVALID_ARGUMENT"))
    return {"mappers": mappers}


def _filter(name: str, kind: str, config: dict) -> dict:
    return {"name": name, "typed_config": {"@type": f"{_T}.http.{kind}", **config}}


def http_filters(s: EdgeSettings, descriptor: str) -> list[dict]:
    health = {"pass_through_mode": False,
              "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
              "cluster_min_healthy_percentages": {GATEWAY_CLUSTER: {"value": 1.0}}}
    ratelimit = {
        "stat_prefix": "edge_ratelimit",
        "token_bucket": {"max_tokens": s.rate_limit_burst, "tokens_per_fill": s.rate_limit_rps,
                         "fill_interval": "1s"},
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                           "runtime_key": "edge_ratelimit_enabled"},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                            "runtime_key": "edge_ratelimit_enforced"},
        "response_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                     "header": {"key": "retry-after", "value": "1"}}],
        "rate_limited_as_resource_exhausted": True,
    }
    transcoder = {
        "proto_descriptor": descriptor, "services": [CHAT_SERVICE], "convert_grpc_status": True,
        "print_options": {"preserve_proto_field_names": True, "always_print_primitive_fields": True,
                          "stream_sse_style_delimited": True},
        "request_validation_options": {"reject_unknown_method": True, "reject_unknown_query_parameters": True,
                                       "reject_binding_body_field_collisions": True},
        "max_request_body_size": s.max_body_bytes, "max_response_body_size": s.max_body_bytes,
    }
    return [
        _filter("envoy.filters.http.health_check", "health_check.v3.HealthCheck", health),
        _filter("envoy.filters.http.local_ratelimit", "local_ratelimit.v3.LocalRateLimit", ratelimit),
        _filter("envoy.filters.http.lua", "lua.v3.Lua", {"default_source_code": {"inline_string": lua.source()}}),
        _filter("envoy.filters.http.grpc_json_transcoder", "grpc_json_transcoder.v3.GrpcJsonTranscoder",
                transcoder),
        _filter("envoy.filters.http.router", "router.v3.Router", {"suppress_envoy_headers": True}),
    ]


def connection_manager(s: EdgeSettings, descriptor: str) -> dict:
    return {
        "@type": f"{_T}.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge", "codec_type": "AUTO", "server_name": "moemesh-edge",
        "use_remote_address": True, "generate_request_id": True, "always_set_request_id_in_response": True,
        "normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "request_headers_timeout": "10s", "stream_idle_timeout": f"{s.stream_idle_timeout_s:g}s",
        # The codec takes up to CODEC_HEADERS_KB so that openai.lua can answer headers over lua.MAX_HEADERS_KB with a
        # gRPC status / 431 (beyond this the HTTP/2 stream is reset: nothing above the codec sees it).
        "max_request_headers_kb": CODEC_HEADERS_KB,
        "common_http_protocol_options": {"idle_timeout": "300s", "max_headers_count": 100,
                                         "headers_with_underscores_action": "DROP_HEADER"},
        # A malformed HTTP/2 request (say, a connection-specific header) resets its stream, not the connection.
        "http2_protocol_options": {"max_concurrent_streams": 128, "initial_stream_window_size": 1 << 20,
                                   "initial_connection_window_size": 2 << 20,
                                   "override_stream_error_on_invalid_http_message": True},
        "route_config": route_config(s, GATEWAY_CLUSTER),
        "http_filters": http_filters(s, descriptor),
        "local_reply_config": local_reply_config(),
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": s.access_log, "log_format": {"json_format": ACCESS_LOG_FIELDS}}}],
    }
