"""The free-port probe of `moemesh up`: a listener makes a port busy, TIME_WAIT left by closed connections does not."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from moemesh.serving.ports import port_free


def _time_wait(port: int) -> bool:
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "06" for r in rows)


def test_a_listener_makes_the_port_busy_and_its_close_frees_it() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free("127.0.0.1", port)
    assert port_free("127.0.0.1", port)


def test_a_port_in_time_wait_after_the_server_closed_first_is_free() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT once the client closes too
        time.sleep(0.05)
        client.close()
    time.sleep(0.05)
    assert _time_wait(port), "no TIME_WAIT: this test would prove nothing"
    assert port_free("127.0.0.1", port)
