"""`moemesh top` stays a light client command, and says what to do when no mesh runs (the live view itself is tested
on a real mesh in tests/e2e/test_monitoring_e2e.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_top_and_the_dashboard_import_no_torch() -> None:
    code = ("import sys; from moemesh.cli import main, top; from moemesh.dashboard import collector, server, top_view,"
            " mesh_hook; main.build_parser(['top']); heavy = [m for m in ('torch', 'redis', 'services.metering')"
            " if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_top_without_a_mesh_says_how_to_start_one(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "top", "--status-file", str(tmp_path / "none.json"),
                          "--iterations", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no running mesh" in out.stderr and "moemesh up" in out.stderr
