"""Supervision of `moemesh up`'s running services: a service that exits, or fails its health checks, is restarted
with backoff on its own port, and counts as serving again only once its health check says SERVING; too many restarts
in a window stop the mesh (the caller prints the log tail).

Why the same port: every peer dials a fixed address (the *_ADDR env), so a restarted service is found again by
gRPC's own channel reconnection, with no re-wiring. Why SIGKILL of the whole process group before a restart: a
service that fails its health checks may be stalled (SIGSTOP, a deadlock) and would ignore SIGTERM; its group also
holds what it started itself (metering's Redis), which must not outlive it.

The health probe and the clock are injected: plain child processes test this module without a mesh.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, start_http_server

from moemesh.serving import status as status_file
from moemesh.serving.server import READY_FILE_ENV
from moemesh.serving.supervisor import Child

REGISTRY = CollectorRegistry()  # the supervisor's own /metrics (not the services': they restart, this stays)
RESTARTS = Counter("moemesh_up_restarts", "Restarts of a mesh service by `moemesh up`, by service and cause.",
                   ["service", "cause"], registry=REGISTRY)


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart and when to give up (flags of `moemesh up`)."""

    max_restarts: int = 5  # a service restarted more often than this within window_s stops the mesh
    window_s: float = 300.0
    backoff_s: float = 0.5  # first delay before a restart; doubles per restart in the window, up to backoff_max_s
    backoff_max_s: float = 10.0
    # A running service is probed this often and restarted after `health_failures` failed probes in a row: a
    # service busy on 2 shared cores may answer a probe late, so only ~15 s of silence counts as stalled.
    health_interval_s: float = 5.0
    health_failures: int = 3
    start_timeout_s: float = 120.0  # a restarted service not SERVING by then is restarted again

    def __post_init__(self) -> None:
        for name in ("window_s", "backoff_s", "backoff_max_s", "health_interval_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be > 0")
        if self.max_restarts < 0 or self.health_failures < 1:
            raise ValueError(f"max_restarts: {self.max_restarts} must be >= 0, health_failures: "
                             f"{self.health_failures} must be >= 1")


class GaveUp(RuntimeError):
    """A service needed more restarts than the policy allows; `name` is the service."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class _Watch:
    """What the supervisor knows about one service."""

    state: str = "running"  # running -> waiting (backoff) -> starting -> running
    due: float = 0.0  # waiting: when to start; starting: when to give up on this start; running: next probe
    failures: int = 0  # failed probes in a row
    restarts: int = 0  # since `moemesh up` started
    recent: deque = field(default_factory=deque)  # times of the restarts within the policy's window


class Supervision:
    """Call `tick()` periodically. `probe(name)` is True when the service is SERVING (never raises);
    `on_serving(name)` runs when a restarted service is SERVING again; `say` prints one line."""

    def __init__(self, children: dict[str, Child], probe: Callable[[str], bool], say: Callable[[str], None],
                 policy: RestartPolicy = RestartPolicy(), *, on_serving: Callable[[str], None] = lambda name: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.children, self.policy, self._probe, self._say = children, policy, probe, say
        self._on_serving, self._clock = on_serving, clock
        now = clock()
        self._watch = {name: _Watch(due=now + policy.health_interval_s) for name in children}

    def restarts(self, name: str) -> int:
        return self._watch[name].restarts if name in self._watch else 0

    def tick(self) -> None:
        """One round over every service; raises GaveUp when a service exhausted its restarts."""
        for name in list(self.children):
            watch = self._watch.setdefault(name, _Watch(due=self._clock() + self.policy.health_interval_s))
            step = {"running": self._running, "waiting": self._waiting, "starting": self._starting}[watch.state]
            step(name, self.children[name], watch)

    def _running(self, name: str, child: Child, watch: _Watch) -> None:
        code = child.exited()
        if code is not None:
            self._restart(name, child, watch, "exit", f"exited with code {code}")
            return
        now = self._clock()
        if now < watch.due:
            return
        watch.due = now + self.policy.health_interval_s
        watch.failures = 0 if self._probe(name) else watch.failures + 1
        if watch.failures >= self.policy.health_failures:
            self._restart(name, child, watch, "health", f"failed {watch.failures} health checks in a row")

    def _waiting(self, name: str, child: Child, watch: _Watch) -> None:
        if self._clock() >= watch.due:
            if _ready_file(child) is not None:
                _ready_file(child).unlink(missing_ok=True)  # the new process writes its own (new metrics port)
            child.start()
            watch.state, watch.due = "starting", self._clock() + self.policy.start_timeout_s
            self._say(f"moemesh up: {name} restarting (pid {child.pid}, restart {watch.restarts})")

    def _starting(self, name: str, child: Child, watch: _Watch) -> None:
        code = child.exited()
        if code is not None:
            self._restart(name, child, watch, "exit", f"exited with code {code} while restarting")
        elif _written(_ready_file(child)) and self._probe(name):
            watch.state, watch.failures = "running", 0
            watch.due = self._clock() + self.policy.health_interval_s
            self._say(f"moemesh up: {name} SERVING again (pid {child.pid}, "
                      f"{self._clock() - child.started:.1f} s after its start)")
            self._on_serving(name)
        elif self._clock() >= watch.due:
            self._restart(name, child, watch, "health", f"not SERVING {self.policy.start_timeout_s:.0f} s after "
                          "its restart")

    def _restart(self, name: str, child: Child, watch: _Watch, cause: str, why: str) -> None:
        """Kills what is left of the service and schedules its restart after the backoff, or gives up."""
        child.kill_group()  # a stalled process ignores SIGTERM; its own children (Redis) go with it
        child.wait(2.0)
        now = self._clock()
        while watch.recent and watch.recent[0] < now - self.policy.window_s:
            watch.recent.popleft()
        if len(watch.recent) >= self.policy.max_restarts:
            raise GaveUp(name, f"{name} {why}; it was restarted {len(watch.recent)} times in the last "
                         f"{self.policy.window_s:.0f} s (--max-restarts {self.policy.max_restarts} "
                         f"--restart-window {self.policy.window_s / 60:g})")
        delay = min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** len(watch.recent))
        watch.recent.append(now)
        watch.restarts += 1
        watch.state, watch.due, watch.failures = "waiting", now + delay, 0
        RESTARTS.labels(name, cause).inc()
        self._say(f"moemesh up: {name} {why}; restarting in {delay:.1f} s")


def add_arguments(p) -> None:
    """The restart flags of `moemesh up`."""
    p.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                   help="restarts of one service within --restart-window after which the mesh stops (default 5)")
    p.add_argument("--restart-window", type=float, default=RestartPolicy.window_s / 60, metavar="MINUTES",
                   help="the window of --max-restarts, in minutes (default 5)")


def policy_from(ns) -> RestartPolicy:
    """A restart may load (even convert) the model again: it gets up's --start-timeout too."""
    return RestartPolicy(max_restarts=ns.max_restarts, window_s=ns.restart_window * 60,
                         start_timeout_s=ns.start_timeout)


def _ready_file(child: Child) -> Path | None:
    path = child.env.get(READY_FILE_ENV)
    return Path(path) if path else None


def _written(path: Path | None) -> bool:
    return path is None or path.exists()


def tcp_open(address: str, timeout: float = 2.0) -> bool:
    """Health of a child without gRPC health (the edge): its port accepts a connection."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def watch_until_given_up(children: dict[str, Child], probe: Callable[[str], bool], policy: RestartPolicy,
                         status_path: Path, host: str, say, tick_s: float = 0.25) -> int:
    """Supervises until a service exhausts its restarts (returns 1, after printing its log tail); a signal ends it
    with an exception. The status file gains `services.<name>.restarts` and `supervisor_metrics_port` (the
    moemesh_up_restarts_total counter)."""
    supervision = Supervision(children, probe, say, policy,
                              on_serving=lambda name: _update_status(status_path, supervision, {}, name))
    server, _ = start_http_server(0, addr=host, registry=REGISTRY)
    _update_status(status_path, supervision, {"supervisor_metrics_port": int(server.server_port)})
    while True:
        try:
            supervision.tick()
        except GaveUp as exc:
            child = supervision.children[exc.name]
            say(f"\nmoemesh up: {exc}; stopping the mesh\n--- last lines of {child.log_path} ---\n"
                f"{child.log_tail()}\n---")
            return 1
        time.sleep(tick_s)


def _update_status(path: Path, supervision: Supervision, extra: dict, restarted: str = "") -> None:
    """Restart counts of every service; for a restarted one also its new pid and metrics port (its ready file)."""
    status = status_file.read(path)
    if status is None:
        return
    for name, entry in status.get("services", {}).items():
        entry["restarts"] = supervision.restarts(name)
        child = supervision.children.get(name)
        if name == restarted and child is not None:
            entry["pid"] = child.pid
            with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
                entry["metrics_port"] = json.loads(_ready_file(child).read_text())["metrics_port"]
    status_file.write(path, {**status, **extra})
