"""What `moemesh up --edge` adds to the mesh (called from moemesh/cli/up.py): the flags, Envoy started once the
gateway is SERVING (as one more supervised child, stopped right after the gateway), and the status file's
`edge_https` / `ca_cert`.

Imports of the edge machinery are deferred: `moemesh up` without --edge does not pay for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "edge"
DEFAULT_PORT = 8443


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge", action="store_true",
                   help="also run Envoy in front of the gateway: HTTPS (TLS 1.3) with OpenAI-compatible HTTP and "
                        "gRPC; base URL https://127.0.0.1:8443/v1, CA in MOEMESH_HOME/certs/ca.pem")
    p.add_argument("--edge-port", type=int, default=DEFAULT_PORT, help="HTTPS port of the edge (0: any free port)")
    p.add_argument("--edge-host", default=None, help="interface of the edge (default: --host)")
    p.add_argument("--edge-rps", type=int, default=None, help="edge rate limit, requests per second (default 200)")


def start(ns: argparse.Namespace, children: dict, gateway_address: str, run_dir: Path, say) -> dict:
    """Starts Envoy in front of `gateway_address`, adds it to `children`, and returns its ready info."""
    from moemesh import home
    from moemesh.certs import grpc_tls
    from moemesh.edge.local import local_settings
    from moemesh.edge.process import start as start_envoy

    host = ns.edge_host or ns.host
    if ns.edge_port and not _port_free(host, ns.edge_port):
        raise RuntimeError(f"edge port {host}:{ns.edge_port} is in use; pick another with --edge-port (0: any)")
    overrides = {}
    if ns.edge_rps:
        overrides.update(rate_limit_rps=ns.edge_rps, rate_limit_burst=2 * ns.edge_rps)
    settings = local_settings([gateway_address], port=ns.edge_port, host=host, run_dir=run_dir,
                              mtls=grpc_tls.mtls_enabled(), **overrides)
    edge = start_envoy(settings, run_dir=run_dir, log_path=home.subdir("logs") / "edge.log")
    children[NAME] = edge.child
    edge.wait_ready(timeout=30.0)
    if not ns.edge_port:  # port 0: a restart by `moemesh up`'s supervision must come back on the port clients know
        from dataclasses import replace

        from moemesh.edge.config import write
        write(replace(settings, listen_port=edge.port), run_dir / "envoy.json")
    say(f"  ok  {NAME:<10} {edge.url:<22} pid {edge.child.pid:<8} (Envoy; OpenAI base URL {edge.url}/v1, "
        f"CA {Path(settings.cert).with_name('ca.pem')})")
    return {"address": edge.url.removeprefix("https://"), "edge_https": edge.url, "admin": edge.admin,
            "ca_cert": str(Path(settings.cert).with_name("ca.pem")), "metrics_port": None}


def _port_free(host: str, port: int) -> bool:
    from moemesh.serving.ports import port_free

    return port_free(host, port)  # SO_REUSEADDR, as Envoy's listener: a port left in TIME_WAIT is free


def status_fields(ready: dict) -> dict:
    """Extra keys of the status file: edge_https and ca_cert (absent without --edge)."""
    info = ready.get(NAME)
    if info is None:
        return {}
    return {"edge_https": info["edge_https"], "ca_cert": info["ca_cert"], "edge_admin": info["admin"]}
