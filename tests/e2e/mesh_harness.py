"""Helpers of the end-to-end tests (the fixture is in conftest.py)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mesh_process
from mesh_process import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0


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
    return mesh_process.wait_status(proc, status_path, output, START_TIMEOUT_S)
