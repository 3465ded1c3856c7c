"""The public edge: Envoy in front of the gateways (TLS 1.3, OpenAI-compatible HTTP via grpc_json_transcoder, native
gRPC, health checks, local rate limit, access logs).

- settings.py: `EdgeSettings`, what the edge is configured with
- config.py (+ http.py, routes.py, cluster.py, lua.py/openai.lua): the Envoy bootstrap rendered from the settings
- descriptor.py: the transcoder's descriptor set; process.py: running Envoy; local.py: `launch(...)` for `moemesh up`
- `python -m moemesh.edge render ...`: a config for standalone use (deploy/envoy/envoy.yaml is one)
"""

from moemesh.edge.config import render, write
from moemesh.edge.local import launch, local_settings
from moemesh.edge.process import EdgeProcess, envoy_binary, start
from moemesh.edge.settings import EdgeSettings, UpstreamTls

__all__ = ["EdgeProcess", "EdgeSettings", "UpstreamTls", "envoy_binary", "launch", "local_settings", "render",
           "start", "write"]
