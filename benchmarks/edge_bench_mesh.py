"""The mesh the edge benchmarks run against: a running one (its status file), or `moemesh up --edge` on the tiny MoE
started here in a temporary MOEMESH_HOME (tests/edge/edge_harness.py, the same harness the tests use)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "edge")]  # mesh_process.py is in tests/
os.environ.setdefault("MOEMESH_MODELS", str(Path.home() / ".cache" / "moemesh-test-models"))

import edge_harness  # noqa: E402
from edge_harness import EdgeMesh  # noqa: E402


def tiny_model(directory: Path) -> Path:
    from moemesh.builtin.tiny import make_tiny_model
    from moemesh.models.registry import resolve_model

    return make_tiny_model(directory / "tiny", tokenizer_from=resolve_model("smollm2", progress=False))


@contextlib.contextmanager
def edge_mesh(status_file: Path | None, *extra: str) -> Iterator[EdgeMesh]:
    """The mesh of `status_file` (left running), or a fresh `moemesh up --edge` on the tiny MoE (stopped after)."""
    if status_file is not None:
        status = json.loads(status_file.read_text())
        home = status_file.parent.parent  # MOEMESH_HOME/run/status.json
        yield EdgeMesh(subprocess.Popen(["true"]), home, status, status_file)
        return
    with tempfile.TemporaryDirectory(prefix="moemesh-edge-bench-") as tmp:
        mesh = edge_harness.start(Path(tmp) / "home", tiny_model(Path(tmp)), *extra)
        try:
            yield mesh
        finally:
            edge_harness.stop(mesh.proc)


def machine() -> dict:
    envoy = subprocess.run([sys.executable, "-c", "from moemesh.edge import envoy_binary; print(envoy_binary())"],
                           capture_output=True, text=True).stdout.strip()
    version = subprocess.run([envoy, "--version"], capture_output=True, text=True).stdout.strip().split("version: ")
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "envoy": version[-1] if version else "?"}
