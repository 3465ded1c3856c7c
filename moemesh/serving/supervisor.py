"""Child service processes of `moemesh up`: each in its own process group, dying with the supervisor even when the
supervisor is SIGKILLed (PR_SET_PDEATHSIG), stopped with SIGTERM then SIGKILL; stdout/stderr to a log file."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child's preexec_fn must not import or allocate much (the parent may have threads).
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent_pid: int, nice: int = 0, sched_batch: bool = False):
    def preexec() -> None:
        os.setpgrp()  # own process group: a terminal's Ctrl-C reaches only the supervisor, which stops us in order
        if nice:
            os.nice(nice)
        if sched_batch:  # SCHED_BATCH: a full share of the CPU, but its wake-ups never preempt a running process
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
                os._exit(1)

    return preexec


@dataclass
class Child:
    """One service process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    started: float = field(default=0.0)
    nice: int = 0  # niceness increment (lower CPU priority), applied in the child before exec
    sched_batch: bool = False  # Linux SCHED_BATCH policy (no wake-up preemption), applied in the child before exec

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(self.argv)}\n".encode())
            log.flush()
            preexec = _die_with_parent(os.getpid(), self.nice, self.sched_batch)
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=preexec)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> int | None:
        """Exit code once the process is gone (negative: killed by that signal), else None."""
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        """SIGTERM to the service only: it drains, then stops what it started itself (e.g. metering's Redis)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL to the whole process group: the service and anything it left behind."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(timeout, 0))
            return True
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:])


def stop_in_order(waves: list[list[Child]], budget_s: float = 10.0, kill_margin_s: float = 1.0) -> list[str]:
    """SIGTERM wave by wave (a wave gets part of the remaining time to drain before the next wave is told);
    whatever is left when only `kill_margin_s` of the budget remains is SIGKILLed, and every process group is
    SIGKILLed at the end so that nothing a service started outlives it. Returns the names that had to be killed."""
    deadline = time.monotonic() + budget_s - kill_margin_s
    for i, wave in enumerate(waves):
        for child in wave:
            child.terminate()
        # Earlier waves (the gateway, draining client streams) get most of the time; later ones only need to exit.
        last = i == len(waves) - 1
        wave_deadline = deadline if last else time.monotonic() + (deadline - time.monotonic()) * 0.6
        for child in wave:
            child.wait(wave_deadline - time.monotonic())
    killed = [c.name for wave in waves for c in wave if c.exited() is None]
    for wave in waves:
        for child in wave:
            child.kill_group()
    for wave in waves:
        for child in wave:
            child.wait(kill_margin_s)
    return killed
