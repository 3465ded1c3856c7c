"""The real mesh for end-to-end tests: `moemesh up` as a subprocess (seven service processes, real sockets) on the
tiny MoE, in a temporary MOEMESH_HOME, on a free gateway port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_harness import ROOT, RunningMesh, free_port, wait_status


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_moe_dir: Path):
    """One mesh per test module; a module's `MESH_UP_ARGS` (e.g. ["--edge", "--edge-port", "0"]) go to `up`."""
    home = tmp_path_factory.mktemp("mesh-home")
    status_path, output = home / "status.json", home / "up.out"
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with output.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(tiny_moe_dir), "--gateway-port",
             str(free_port()), "--status-file", str(status_path), *getattr(request.module, "MESH_UP_ARGS", ())],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield RunningMesh(proc, home, status_path, wait_status(proc, status_path, output), output)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
