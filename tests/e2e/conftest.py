"""The real mesh for end-to-end tests: `moemesh up` as a subprocess (seven service processes, real sockets) on the
tiny MoE, in a temporary MOEMESH_HOME, on a free gateway port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def _wait_status(proc: subprocess.Popen, status_path: Path, output: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if status_path.exists():
            return json.loads(status_path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"moemesh up exited with {proc.returncode}:\n{output.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"mesh not SERVING after {START_TIMEOUT_S} s:\n{output.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_moe_dir: Path):
    home = tmp_path_factory.mktemp("mesh-home")
    status_path, output = home / "status.json", home / "up.out"
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with output.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(tiny_moe_dir), "--gateway-port",
             str(free_port()), "--status-file", str(status_path)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield RunningMesh(proc, home, status_path, _wait_status(proc, status_path, output), output)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
