"""What `moemesh up --edge` adds, without the whole mesh: Envoy as a supervised child in front of a gateway, the
status file's edge_https / ca_cert, and a clear error for a port in use."""

from __future__ import annotations

import argparse
import socket

import pytest

from edge_clients import http_client
from moemesh.edge import mesh_hook


def _ns(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    mesh_hook.add_arguments(parser)
    ns = parser.parse_args(["--edge", "--edge-port", "0", "--edge-rps", "50"])
    vars(ns).update(overrides)
    return ns


def test_the_hook_starts_a_supervised_edge_and_fills_the_status(edge_home, fake_gateway, tmp_path) -> None:
    children, said = {}, []
    info = mesh_hook.start(_ns(), children, fake_gateway.address, tmp_path, said.append)
    try:
        status = mesh_hook.status_fields({"edge": info})
        assert status["edge_https"].startswith("https://127.0.0.1:") and "OpenAI base URL" in said[0]
        assert status["ca_cert"] == str(edge_home / "certs" / "ca.pem")
        assert children["edge"].exited() is None and (tmp_path / "envoy.json").is_file()
        with http_client(edge_home) as client:
            assert client.get(f"{status['edge_https']}/healthz").status_code == 200
    finally:
        children["edge"].terminate()
        assert children["edge"].wait(5)
    assert mesh_hook.status_fields({}) == {}


def test_a_busy_edge_port_is_named(edge_home, fake_gateway, tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"edge port 127.0.0.1:{port} is in use"):
            mesh_hook.start(_ns(edge_port=port), {}, fake_gateway.address, tmp_path, print)
