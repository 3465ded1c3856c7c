"""A real Prometheus (Debian's /usr/bin/prometheus) for the monitoring tests, configured from
deploy/observability/prometheus.yml with only the dashboard's address and the intervals changed (1 s instead of 15 s,
so a test sees data within seconds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from mesh_harness import ROOT, free_port

PROMETHEUS = "/usr/bin/prometheus"
OBSERVABILITY = ROOT / "deploy" / "observability"


def missing() -> str | None:
    """Why the Prometheus tests cannot run here (None: they can); `make install` installs it."""
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            return f"{tool} not found: run `make install` (apt-get install prometheus)"
    return None


def config_for(dashboard_url: str, workdir: Path) -> Path:
    """deploy/observability/prometheus.yml pointed at `dashboard_url`, scraping and evaluating every second."""
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(OBSERVABILITY / "alerts.yml")]
    job = config["scrape_configs"][0]
    job["http_sd_configs"][0].update(url=dashboard_url.rstrip("/") + "/sd", refresh_interval="1s")
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, config: Path, workdir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address={self.address}"], stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"prometheus not ready after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; the `data` of a success, else an AssertionError with Prometheus' error."""
        url = f"http://{self.address}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
