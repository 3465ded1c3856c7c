"""The dashboard's memory: a scrape of the whole mesh every second, the last few minutes of chart points, the latest
running totals, and the tenants' month spend and budgets (metering's ListTenants, every few seconds).

History is plain data (no sockets): tests feed it Snapshots; Collector adds the loop that scrapes the status file's
endpoints on a daemon thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path

from moemesh.dashboard import panels
from moemesh.dashboard.query import Snapshot
from moemesh.dashboard.scrape import scrape, targets
from moemesh.serving import status as status_file

WINDOW_S = 10.0  # rates and quantiles over the last 10 s: a 1 s window is mostly empty at a few requests per second
KEEP_POINTS = 900  # 15 minutes of 1 s points


class History:
    """Snapshots of the last WINDOW_S seconds, chart points of the last KEEP_POINTS scrapes, the latest totals."""

    def __init__(self, window_s: float = WINDOW_S, keep: int = KEEP_POINTS) -> None:
        self.window_s = window_s
        self._snaps: collections.deque[Snapshot] = collections.deque()
        self._points: collections.deque[dict] = collections.deque(maxlen=keep)
        self._latest: Snapshot | None = None
        self.accounts: dict[str, dict] = {}  # tenant -> {"budget_usd", "month_spent_usd", "month_held_usd"}
        self._lock = threading.Lock()  # the HTTP threads read while the scrape thread adds

    def add(self, snap: Snapshot) -> dict | None:
        """Adds a scrape; returns its chart point (None for the very first scrape: a rate needs two)."""
        with self._lock:
            self._snaps.append(snap)
            while len(self._snaps) > 2 and snap.t - self._snaps[1].t >= self.window_s:
                self._snaps.popleft()  # keep the oldest snapshot that still spans the whole window
            self._latest = snap
            if len(self._snaps) < 2:
                return None
            p = panels.point(self._snaps[0], snap)
            p["up"] = dict(snap.up)
            self._points.append(p)
            return p

    def points_since(self, t: float) -> list[dict]:
        with self._lock:
            return [p for p in self._points if p["t"] > t]

    def totals(self) -> dict:
        """Running totals of the latest scrape: the tenant table, the expert heat map, which services answered."""
        with self._lock:
            snap, accounts = self._latest, dict(self.accounts)
        if snap is None:
            return {"tenants": [], "experts": panels.expert_heat(Snapshot(0.0)), "up": {}}
        return {"tenants": panels.tenant_table(snap, accounts), "experts": panels.expert_heat(snap),
                "up": dict(snap.up), "t": snap.t}


def list_accounts(metering_address: str, timeout_s: float = 2.0) -> dict[str, dict]:
    """Month spend and budget of every tenant, from metering (ListTenants: an admin call, so it carries the admin
    token of this MOEMESH_HOME, the one `moemesh up` and metering share; see services/metering/admin.py)."""
    from moemesh.certs import grpc_tls
    from moemesh.v1 import metering_pb2, metering_pb2_grpc
    from services.metering.admin import METADATA_KEY, load_or_create_admin_token

    metadata = ((METADATA_KEY, load_or_create_admin_token()),)
    with grpc_tls.channel(metering_address) as channel:
        reply = metering_pb2_grpc.MeteringStub(channel).ListTenants(metering_pb2.ListTenantsRequest(),
                                                                     metadata=metadata, timeout=timeout_s)
    return {t.name: {"budget_usd": t.quota.monthly_budget_usd, "month_spent_usd": t.month_spent_usd,
                     "month_held_usd": t.month_held_usd} for t in reply.tenants}


class Collector:
    """Scrapes the mesh named by a status file every `period_s` on a daemon thread, into `history`."""

    def __init__(self, status_path: Path, period_s: float = 1.0, accounts_every_s: float = 5.0,
                 read_status: Callable[[Path], dict | None] = status_file.read) -> None:
        self.status_path, self.period_s, self.accounts_every_s = status_path, period_s, accounts_every_s
        self.history = History()
        self._read_status = read_status
        self._stop = threading.Event()
        self._accounts_at = 0.0
        self.last_error = ""  # why the last metering call failed (shown on the page), "" when fine

    def status(self) -> dict:
        # Re-read each time: a restarted service gets a new metrics port (moemesh/cli/supervision.py rewrites it).
        return self._read_status(self.status_path) or {}

    def tick(self) -> dict | None:
        status = self.status()
        snap = scrape(targets(status))
        snap.aliases = {svc.get("address"): name for name, svc in (status.get("services") or {}).items()}
        point = self.history.add(snap)
        metering = (status.get("services") or {}).get("metering", {}).get("address")
        if metering and time.monotonic() - self._accounts_at >= self.accounts_every_s:
            self._accounts_at = time.monotonic()
            try:
                self.history.accounts = list_accounts(metering)
                self.last_error = ""
            except Exception as exc:  # grpc.RpcError and friends: the charts go on without budgets
                self.last_error = f"metering ListTenants: {exc.__class__.__name__}"
        return point

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="dashboard-collector", daemon=True)
        thread.start()
        return thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception as exc:  # never let one bad scrape end the dashboard
                self.last_error = f"scrape: {exc.__class__.__name__}: {exc}"
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
