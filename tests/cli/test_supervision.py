"""Restarts by `moemesh up`'s supervision, on plain child processes (no mesh): an exit and a stalled process are
restarted after their backoff and count as serving only once the probe says so; too many restarts give up."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from moemesh.cli.supervision import RESTARTS, GaveUp, RestartPolicy, Supervision
from moemesh.serving.server import READY_FILE_ENV
from moemesh.serving.supervisor import Child

# Writes its ready file (as a service does once SERVING), then sleeps; exits after 0.2 s instead while the file
# argv[1] exists (consuming it: the restarted process lives on).
SERVICE = ("import os, sys, time; open(os.environ['MOEMESH_READY_FILE'], 'w').write('{}'); "
           "crash = os.path.exists(sys.argv[1]); crash and os.remove(sys.argv[1]); time.sleep(0.2 if crash else 60)")
FAST = RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.05, backoff_max_s=0.2, health_interval_s=0.05,
                     health_failures=2, start_timeout_s=10)


def _child(tmp_path: Path, name: str, crashes: bool = False) -> Child:
    env = {**os.environ, READY_FILE_ENV: str(tmp_path / f"{name}.json")}
    crash_file = tmp_path / f"{name}.crash"
    if crashes:
        crash_file.touch()
    return Child(name, [sys.executable, "-c", SERVICE, str(crash_file)], env, tmp_path / f"{name}.log")


def _until(supervision: Supervision, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        supervision.tick()
        time.sleep(0.02)


def _count(name: str, cause: str) -> float:
    return RESTARTS.labels(name, cause)._value.get()


def test_an_exited_service_is_restarted_and_serving_again_only_after_its_probe(tmp_path: Path) -> None:
    child = _child(tmp_path, "svc", crashes=True)
    child.start()
    healthy, said, serving = {"ok": True}, [], []
    sup = Supervision({"svc": child}, lambda name: healthy["ok"], said.append, FAST, on_serving=serving.append)
    first_pid, before = child.pid, _count("svc", "exit")
    _until(sup, lambda: child.pid != first_pid)  # exited after 0.2 s, restarted after the backoff
    healthy["ok"] = False
    time.sleep(0.3)  # its ready file is written by now
    sup.tick()
    assert serving == [] and sup.restarts("svc") == 1  # started, but the probe does not say SERVING yet
    healthy["ok"] = True
    _until(sup, lambda: serving == ["svc"])
    assert _count("svc", "exit") == before + 1
    assert any("exited with code 0; restarting in" in line for line in said)
    assert any("SERVING again" in line for line in said)
    child.kill_group()


def test_a_stalled_service_fails_its_probes_and_is_killed_and_restarted(tmp_path: Path) -> None:
    child = _child(tmp_path, "stalled")
    child.start()
    stalled_pid = child.pid
    os.kill(stalled_pid, signal.SIGSTOP)  # ignores SIGTERM from now on: only SIGKILL ends it
    probe = lambda name: child.pid != stalled_pid  # noqa: E731  the new process answers
    serving: list[str] = []
    sup = Supervision({"stalled": child}, probe, lambda line: None, FAST, on_serving=serving.append)
    _until(sup, lambda: serving == ["stalled"])
    assert sup.restarts("stalled") == 1 and child.pid != stalled_pid
    assert not Path(f"/proc/{stalled_pid}").exists() or _zombie(stalled_pid)
    child.kill_group()


def test_too_many_restarts_in_the_window_give_up(tmp_path: Path) -> None:
    child = Child("crashy", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "c.log")
    child.start()
    sup = Supervision({"crashy": child}, lambda name: False, lambda line: None, FAST)
    with pytest.raises(GaveUp) as gave_up:
        _until(sup, lambda: False)
    assert gave_up.value.name == "crashy" and sup.restarts("crashy") == FAST.max_restarts
    assert "exited with code 3" in str(gave_up.value) and "restarted 3 times" in str(gave_up.value) and "--max-restarts 3" in str(gave_up.value)


def test_the_policy_names_a_bad_value() -> None:
    with pytest.raises(ValueError, match="window_s: 0"):
        RestartPolicy(window_s=0)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"
