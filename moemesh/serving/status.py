"""The status file `moemesh up` writes once every service is SERVING (default MOEMESH_HOME/run/status.json), read by
`moemesh chat` (endpoint, API key, model) and by tests.

    {"gateway": "127.0.0.1:50051", "api_key": "...", "model": "smollm2-moe", "pid": <supervisor>, "started": <unix>,
     "services": {"gateway": {"name": "gateway", "address": "...", "pid": 123, "metrics_port": 41234,
                              "log": ".../logs/gateway.log", "restarts": 0}, "tokenizer": {...}, ...},
     "supervisor_metrics_port": 41235}
`restarts` (how often `moemesh up` restarted the service) and `supervisor_metrics_port` (its /metrics, with
moemesh_up_restarts_total) are added once the mesh is SERVING, and updated after each restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moemesh import home


def default_path() -> Path:
    return home.subdir("run") / "status.json"


def write(path: Path, status: dict[str, Any]) -> None:
    """Atomic write, mode 0600 (it holds an API key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(status, f, indent=2)
        f.write("\n")
    tmp.replace(path)


def read(path: Path | None = None) -> dict[str, Any] | None:
    """The status of a running mesh, or None when there is none (no file, or its supervisor is gone)."""
    path = path or default_path()
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = status.get("pid")
    if isinstance(pid, int) and not _alive(pid):
        return None
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
