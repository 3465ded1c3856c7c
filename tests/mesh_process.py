"""What every test (and benchmark) that runs `moemesh up` as a subprocess needs: a free port, waiting for the status
file, and stopping it (SIGINT, then the whole process group)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_status(proc: subprocess.Popen, status_path: Path, output: Path, timeout_s: float) -> dict:
    """The status file `moemesh up` writes once every service is SERVING; fails with the tail of its output when it
    exits first or takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if status_path.exists():
            return json.loads(status_path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"moemesh up exited with {proc.returncode}:\n{output.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"mesh not SERVING after {timeout_s} s:\n{output.read_text()[-4000:]}")


def stop_mesh(proc: subprocess.Popen) -> None:
    """SIGINT (a clean stop of every service), then SIGKILL of the process group `up` leads after 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
