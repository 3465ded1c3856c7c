"""Child processes of `moemesh up`: own process group, death with the supervisor (even on SIGKILL), ordered stop
with SIGKILL for processes that ignore SIGTERM, log tails. Plain Python children, no mesh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moemesh.serving.supervisor import Child, stop_in_order

# The marker is built at run time: the log's first line (the command) must not already contain it.
SLEEPER = "import time, sys; print('UP' + 'NOW', flush=True); time.sleep(60)"
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('UP' + 'NOW', flush=True); "
            "time.sleep(60)")


def _child(tmp_path: Path, name: str, code: str) -> Child:
    return Child(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log")


def _wait_log(child: Child, text: str = "UPNOW") -> None:
    deadline = time.monotonic() + 20
    while text not in child.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_ordered_stop_terminates_and_kills_the_stubborn(tmp_path: Path) -> None:
    polite, stubborn = _child(tmp_path, "polite", SLEEPER), _child(tmp_path, "stubborn", STUBBORN)
    for c in (polite, stubborn):
        c.start()
    for c in (polite, stubborn):
        _wait_log(c)
    assert os.getpgid(polite.pid) == polite.pid != os.getpgid(0)  # own process group
    start = time.monotonic()
    killed = stop_in_order([[polite], [stubborn]], budget_s=3.0, kill_margin_s=0.5)
    assert killed == ["stubborn"] and time.monotonic() - start < 3.5
    assert polite.exited() == -signal.SIGTERM and stubborn.exited() == -signal.SIGKILL


def test_children_die_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    """A throwaway supervisor starts a child, reports its pid, and is SIGKILLed: the child must not survive."""
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from moemesh.serving.supervisor import Child\n"
        f"c = Child('x', [sys.executable, '-c', {SLEEPER!r}], dict(os.environ), Path({str(tmp_path / 'x.log')!r}))\n"
        "c.start(); print(c.pid, flush=True); time.sleep(60)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(supervisor.stdout.readline())
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 10
    while not _gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child_pid)


def test_log_tail_and_exit_code(tmp_path: Path) -> None:
    child = _child(tmp_path, "crash", "import sys; print('\\n'.join(f'line {i}' for i in range(40))); sys.exit(3)")
    child.start()
    assert child.wait(20) and child.exited() == 3
    tail = child.log_tail(5).splitlines()
    assert tail == [f"line {i}" for i in range(35, 40)]
