"""`moemesh up` starts again at once after a stop, even with clients connected at the stop (issue 12): their
connections leave the edge and gateway ports in TIME_WAIT, which must not count as "in use"."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from moemesh.sdk import ChatClient

from mesh_harness import ROOT, free_port
from mesh_process import wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _up(home: Path, model: Path, gateway_port: int, edge_port: int, output: Path) -> subprocess.Popen:
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with output.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(model), "--gateway-port",
             str(gateway_port), "--edge", "--edge-port", str(edge_port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _https_keep_alive(url: str, ca: str) -> ssl.SSLSocket:
    """A TLS connection to the edge that has served one keep-alive request and stays open."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca)
    sock = context.wrap_socket(socket.create_connection((host, int(port)), timeout=30), server_hostname=host)
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def _time_wait(port: int) -> bool:
    """A connection of 127.0.0.1:port is in TIME_WAIT (state 06 in /proc/net/tcp)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "06" for r in rows)


def test_up_starts_at_once_after_a_stop_with_clients_connected(tmp_path: Path, tiny_moe_dir: Path) -> None:
    home, status_path = tmp_path / "home", tmp_path / "home" / "run" / "status.json"
    gateway_port, edge_port = free_port(), free_port()
    first = _up(home, tiny_moe_dir, gateway_port, edge_port, tmp_path / "up1.out")
    try:
        status = wait_status(first, status_path, tmp_path / "up1.out", 240)
        https = _https_keep_alive(status["edge_https"], status["ca_cert"])  # still connected at the stop
        chat = ChatClient(status["gateway"], status["api_key"], model=status["model"], timeout=60)
        assert chat.complete("hi", max_tokens=2).choices[0].message.content is not None
        _stop(first)
        while https.recv(4096):  # the edge closed the connection first (TLS close_notify, FIN): read to the end,
            pass
        https.close()  # so that this close is clean and the edge's end of it sits in TIME_WAIT
        chat.close()
        assert _time_wait(edge_port), "no TIME_WAIT on the edge port: the test proves nothing"
        started = time.monotonic()
        second = _up(home, tiny_moe_dir, gateway_port, edge_port, tmp_path / "up2.out")
        try:
            status = wait_status(second, status_path, tmp_path / "up2.out", 60)
            print(f"\nSERVING again {time.monotonic() - started:.1f} s after the stop")
            with httpx2.Client(verify=status["ca_cert"], timeout=30) as again:
                assert again.get(f"{status['edge_https']}/healthz").status_code == 200
        finally:
            _stop(second)
    finally:
        _stop(first)
