"""Where the mesh writes: MOEMESH_HOME (default ~/.moemesh) holds converted models, Redis data, certificates,
traces and logs. MOEMESH_MODELS overrides only the model cache (tests share one cache across temporary homes)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("MOEMESH_HOME") or Path.home() / ".moemesh").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    """MOEMESH_HOME/<name>, created on first use ("redis", "certs", "traces", "logs", "run")."""
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    override = os.environ.get("MOEMESH_MODELS")
    path = Path(override).expanduser() if override else home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
