"""Helpers of the end-to-end tests (the fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningMesh:
    proc: subprocess.Popen
    home: Path
    status_path: Path
    status: dict
    output_path: Path

    @property
    def gateway(self) -> str:
        return self.status["gateway"]

    @property
    def api_key(self) -> str:
        return self.status["api_key"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "MOEMESH_HOME": str(self.home)}

    def pids(self) -> list[int]:
        return [s["pid"] for s in self.status["services"].values()]


def wait_status(proc: subprocess.Popen, status_path: Path, output: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if status_path.exists():
            return json.loads(status_path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"moemesh up exited with {proc.returncode}:\n{output.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"mesh not SERVING after {START_TIMEOUT_S} s:\n{output.read_text()[-4000:]}")
