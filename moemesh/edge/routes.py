"""Routes of the edge, matched on gRPC paths: HTTP calls reach them after the transcoder rewrote the path (it clears
the route cache), native gRPC calls directly. Anything else (reflection, other services) has no route: 404 for HTTP,
UNIMPLEMENTED for gRPC. Only moemesh.v1.Chat and grpc.health.v1.Health reach the gateways.

Timeouts: a stream has no route timeout (it may run for minutes) but an idle timeout; a unary completion gets a
little more than the gateway's own deadline so that the gateway's DEADLINE_EXCEEDED (with its message) comes first.
A client's grpc-timeout is honoured. Retries only where no work can be repeated: a completion is retried only when
it never reached a gateway (connect failure, refused stream, reset before the request went out); listing models and
health checks are idempotent and also retried on UNAVAILABLE and 5xx.
"""

from __future__ import annotations

from moemesh.edge.settings import EdgeSettings

SAFE_RETRY = "connect-failure,refused-stream,reset-before-request"
IDEMPOTENT_RETRY = f"{SAFE_RETRY},reset,5xx,unavailable"


def _retry(on: str) -> dict:
    return {"retry_on": on, "num_retries": 2, "per_try_timeout": "0s",
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 3,
            "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"}}


def _route(name: str, match: dict, cluster: str, *, timeout: str, idle: str | None, grpc_max: str,
           retry: str) -> dict:
    action = {"cluster": cluster, "timeout": timeout, "retry_policy": _retry(retry),
              "max_stream_duration": {"grpc_timeout_header_max": grpc_max}}
    if idle is not None:
        action["idle_timeout"] = idle
    return {"name": name, "match": match, "route": action}


def route_config(s: EdgeSettings, cluster: str) -> dict:
    unary = f"{s.request_timeout_s:g}s"
    idle = f"{s.stream_idle_timeout_s:g}s"
    chat = "/moemesh.v1.Chat/"
    routes = [
        _route("chat_stream", {"path": f"{chat}StreamChatCompletion"}, cluster, timeout="0s", idle=idle,
               grpc_max="0s", retry=SAFE_RETRY),
        _route("chat_create", {"path": f"{chat}CreateChatCompletion"}, cluster, timeout=unary, idle=unary,
               grpc_max=unary, retry=SAFE_RETRY),
        _route("completion_stream", {"path": f"{chat}StreamCompletion"}, cluster, timeout="0s", idle=idle,
               grpc_max="0s", retry=SAFE_RETRY),
        _route("models", {"path": f"{chat}ListModels"}, cluster, timeout="10s", idle=None, grpc_max="10s",
               retry=IDEMPOTENT_RETRY),
        _route("chat_other", {"prefix": chat}, cluster, timeout=unary, idle=unary, grpc_max=unary,
               retry=SAFE_RETRY),
        _route("health", {"prefix": "/grpc.health.v1.Health/"}, cluster, timeout="5s", idle=None, grpc_max="5s",
               retry=IDEMPOTENT_RETRY),
    ]
    return {"name": "edge", "virtual_hosts": [{"name": "moemesh", "domains": ["*"], "routes": routes}]}
