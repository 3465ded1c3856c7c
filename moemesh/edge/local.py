"""The edge of a mesh on this machine (`moemesh up --edge`): development certificates from MOEMESH_HOME/certs,
the checked-in descriptor set, admin on a free loopback port, access log in MOEMESH_HOME/logs/edge-access.log."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

from moemesh import home
from moemesh.certs import ensure_peer, ensure_server
from moemesh.edge.descriptor import descriptor_path
from moemesh.edge.process import EdgeProcess, start
from moemesh.edge.settings import EdgeSettings, UpstreamTls

DEFAULT_PORT = 8443


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_settings(gateways: list[str] | tuple[str, ...], *, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                   run_dir: Path | None = None, mtls: bool = False, **overrides) -> EdgeSettings:
    server = ensure_server()
    upstream = None
    if mtls:
        edge = ensure_peer("edge")
        upstream = UpstreamTls(ca=str(edge.ca), cert=str(edge.cert), key=str(edge.key))
    settings = EdgeSettings(
        gateways=tuple(gateways), cert=str(server.cert), key=str(server.key),
        descriptor=str(descriptor_path(run_dir or home.subdir("run"))), listen_host=host, listen_port=port,
        admin_port=free_port(), access_log=str(home.subdir("logs") / "edge-access.log"), upstream_tls=upstream)
    return replace(settings, **overrides) if overrides else settings


def launch(gateways: list[str] | tuple[str, ...], *, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
           run_dir: Path | None = None, timeout: float = 30.0, mtls: bool = False, **overrides) -> EdgeProcess:
    """Starts Envoy in front of `gateways` and waits until it serves HTTPS (its URL: `.url`)."""
    run_dir = run_dir or home.subdir("run")
    settings = local_settings(gateways, port=port, host=host, run_dir=run_dir, mtls=mtls, **overrides)
    edge = start(settings, run_dir=run_dir, log_path=home.subdir("logs") / "edge.log")
    try:
        edge.wait_ready(timeout)
    except BaseException:
        edge.stop()
        raise
    return edge
