"""Shared gRPC plumbing of the moemesh services (one concept per module):

- server.py: `run_service(config, register, name=...)`, `start_service`, graceful drain, health, reflection,
  `exit_now(code)` (end a service's main() without the ~2 s interpreter teardown of torch)
- testing.py: `serve_in_process(register)` for tests (port 0, inside the test's loop)
- config.py: `ServiceConfig` base, `setting(...)`, peer address env names, `ConfigError`
- interceptors.py / errors.py: exception -> status mapping (`ServiceError`), drain refusal, RPC metrics
- telemetry.py: tracing setup, `client_channel(addr)`, `sync_client_channel(addr)`, `request_scope(request_id)`
- metrics.py: Prometheus endpoint and RPC metrics; logging.py: log records with trace_id/span_id
- tensors.py: `to_proto(tensor)` / `from_proto(msg)`
"""

from moemesh.serving.config import ConfigError, ServiceConfig, check_address, setting
from moemesh.serving.errors import ServiceError, status_for
from moemesh.serving.server import RunningService, exit_now, run_service, start_service
from moemesh.serving.telemetry import client_channel, request_scope, setup_tracing, sync_client_channel
from moemesh.serving.testing import serve_in_process

__all__ = [
    "ConfigError", "RunningService", "exit_now", "ServiceConfig", "ServiceError", "check_address", "client_channel",
    "request_scope", "run_service", "serve_in_process", "setting", "setup_tracing", "start_service",
    "status_for", "sync_client_channel",
]
