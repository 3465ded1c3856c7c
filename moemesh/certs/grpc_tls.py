"""gRPC over mTLS between mesh services: a config option, off unless MOEMESH_MTLS is set (1/true/yes/on).

With it on, every server listens with its development certificate (MOEMESH_HOME/certs/mtls/<service>.pem, made on
first use) and accepts only clients presenting a certificate of the same CA; every client channel verifies the server
against that CA and presents its own (named by MOEMESH_MTLS_NAME, else OTEL_SERVICE_NAME, else "client"). Off, the
helpers below are plain insecure ports and channels, as before.

    port = listen(server, "127.0.0.1:50051", "gateway")      # moemesh/serving/server.py
    channel = aio_channel("127.0.0.1:50052", options)          # moemesh/serving/telemetry.py
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc

from moemesh.certs.layout import CertPaths, ensure_peer

MTLS_ENV = "MOEMESH_MTLS"
NAME_ENV = "MOEMESH_MTLS_NAME"


def mtls_enabled() -> bool:
    return os.environ.get(MTLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def server_credentials(paths: CertPaths, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(paths.key.read_bytes(), paths.cert.read_bytes())],
                                       root_certificates=paths.ca.read_bytes(),
                                       require_client_auth=require_client_auth)


def channel_credentials(paths: CertPaths) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=paths.ca.read_bytes(),
                                        private_key=paths.key.read_bytes(),
                                        certificate_chain=paths.cert.read_bytes())


def client_paths() -> CertPaths:
    name = os.environ.get(NAME_ENV) or os.environ.get("OTEL_SERVICE_NAME") or "client"
    return ensure_peer(name.lower())


def listen(server, address: str, name: str) -> int:
    """Binds `server` (sync or aio) to `address`: mTLS with peer `name`'s certificate when on, else plaintext."""
    if not mtls_enabled():
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(ensure_peer(name.lower())))


def channel(address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    if not mtls_enabled():
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(client_paths()), options=list(options))


def aio_channel(address: str, options: Sequence[tuple[str, object]] = (), interceptors=None) -> grpc.aio.Channel:
    if not mtls_enabled():
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(client_paths()), options=list(options),
                                   interceptors=interceptors)
