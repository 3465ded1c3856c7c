"""gRPC credentials from the development certificates, for mTLS between mesh services (a config option: off unless
MOEMESH_MTLS is set). A server made with `server_credentials` accepts only clients holding a certificate signed by
the same CA; a channel made with `channel_credentials` verifies the server against that CA and presents its own.

    paths = ensure_peer("gateway")                      # MOEMESH_HOME/certs/mtls/gateway.{pem,key}
    server.add_secure_port(addr, server_credentials(paths))
    grpc.aio.secure_channel(addr, channel_credentials(ensure_peer("edge")))
"""

from __future__ import annotations

import os

import grpc

from moemesh.certs.layout import CertPaths, ensure_peer

MTLS_ENV = "MOEMESH_MTLS"


def server_credentials(paths: CertPaths, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(paths.key.read_bytes(), paths.cert.read_bytes())],
                                       root_certificates=paths.ca.read_bytes(),
                                       require_client_auth=require_client_auth)


def channel_credentials(paths: CertPaths) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=paths.ca.read_bytes(),
                                        private_key=paths.key.read_bytes(),
                                        certificate_chain=paths.cert.read_bytes())


def mtls_enabled() -> bool:
    return os.environ.get(MTLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def peer_paths(name: str) -> CertPaths | None:
    """This peer's certificate when mTLS is on (made on first use), else None."""
    return ensure_peer(name) if mtls_enabled() else None
