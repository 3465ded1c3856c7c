"""Reading the mesh's /metrics endpoints: which ones (from the status file `moemesh up` keeps current, so a restarted
service's new metrics port is picked up), and their text turned into a Snapshot."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from moemesh.dashboard.query import Snapshot

SUPERVISOR = "supervisor"  # the `moemesh up` process itself: moemesh_up_restarts_total


def targets(status: dict) -> dict[str, str]:
    """job -> host:port of its /metrics, for every service of the status file that has a metrics port."""
    out = {}
    for name, svc in (status.get("services") or {}).items():
        port = svc.get("metrics_port")
        if port:
            host = svc.get("address", "127.0.0.1:0").rpartition(":")[0] or "127.0.0.1"
            out[name] = f"{host}:{port}"
    if status.get("supervisor_metrics_port"):
        host = (status.get("gateway") or "127.0.0.1:0").rpartition(":")[0] or "127.0.0.1"
        out[SUPERVISOR] = f"{host}:{status['supervisor_metrics_port']}"
    return out


def parse_into(snap: Snapshot, job: str, text: str) -> None:
    """Adds every sample of one exposition text to snap with label job=<job>; `_created` samples (the counter's
    creation time, not a value) are dropped."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            snap.add(sample.name, {**sample.labels, "job": job}, float(sample.value))


def fetch(address: str, timeout_s: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        return response.read().decode()


def scrape(jobs: dict[str, str], timeout_s: float = 2.0) -> Snapshot:
    """One Snapshot of all jobs, fetched in parallel (a slow service must not delay the others' numbers)."""
    snap = Snapshot(time.time())

    def one(item: tuple[str, str]) -> tuple[str, str | None]:
        job, address = item
        try:
            return job, fetch(address, timeout_s)
        except (OSError, ValueError):
            return job, None

    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        for job, text in pool.map(one, jobs.items()):
            snap.up[job] = text is not None
            if text is not None:
                try:
                    parse_into(snap, job, text)
                except ValueError:
                    snap.up[job] = False  # half-written exposition: treat as a failed scrape
    return snap
