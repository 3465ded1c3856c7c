"""The real mesh with its edge: `moemesh up --edge` as a subprocess on the tiny MoE in a temporary MOEMESH_HOME (the
default status path under it, so code reading the running mesh's status finds it), gateway on a free port, Envoy on
any free port (read back from the status file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mesh_process import free_port, wait_status

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0


@dataclass
class EdgeMesh:
    proc: subprocess.Popen
    home: Path
    status: dict
    output: Path

    @property
    def url(self) -> str:
        return self.status["edge_https"]

    @property
    def ca_cert(self) -> str:
        return self.status["ca_cert"]

    @property
    def api_key(self) -> str:
        return self.status["api_key"]

    @property
    def model(self) -> str:
        return Path(self.status["model"]).name  # the checkpoint directory's name is an accepted alias

    def env(self) -> dict[str, str]:
        return {**os.environ, "MOEMESH_HOME": str(self.home)}

    def pids(self) -> dict[str, int]:
        return {name: s["pid"] for name, s in self.status["services"].items()}

    def alive(self) -> dict[str, bool]:
        out = {}
        for name, pid in self.pids().items():
            try:
                os.kill(pid, 0)
                out[name] = True
            except ProcessLookupError:
                out[name] = False
        return out

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moemesh.cli.main", *args], env=self.env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)


def start(home: Path, model_dir: Path, *extra: str) -> EdgeMesh:
    home.mkdir(parents=True, exist_ok=True)
    status_path, output = home / "run" / "status.json", home / "up.out"
    # A request without max_tokens (hostile cases send some) generates 4 tokens, not the default 256.
    env = {**os.environ, "MOEMESH_HOME": str(home), "MOEMESH_GATEWAY_DEFAULT_MAX_TOKENS": "4"}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with output.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(model_dir), "--gateway-port",
             str(free_port()), "--edge", "--edge-port", "0", *extra],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        return EdgeMesh(proc, home, wait_status(proc, status_path, output, START_TIMEOUT_S), output)
    except AssertionError:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
