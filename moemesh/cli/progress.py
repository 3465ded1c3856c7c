"""What `moemesh up` shows while the mesh starts: the first start converts the built-in model (about two minutes
on 2 CPU cores) and every service loads it, all of which only the services' logs saw before.

StartProgress tails each service's log (MOEMESH_HOME/logs/<service>.log, from where it ended before this start) on a
background thread and echoes the lines that tell a person where the start is: the model build and conversion
(`[moemesh] ...`, `[convert ...]`), a model loaded; when nothing was said for a while, which services it is still
waiting for. Services becoming SERVING are reported by up.wait_ready itself.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from moemesh import home

# Measured on 2 CPU cores shared with other work (README "Quick start", load average 7-11): an empty MOEMESH_HOME
# took 6.4 and 13.8 minutes; the conversion needs 100-380 CPU-seconds (benchmarks/results/quality.md), hence about 2
# minutes on idle cores. With the model cached, a start took 8-26 s.
FIRST_START_MINUTES = (2, 14)
BUILTIN = ("smollm2", "smollm2-moe")
_CONVERSION = re.compile(r"^\[(moemesh|convert)")  # registry.py and convert/pipeline.py progress lines
_LAYER = re.compile(r"layer (\d+)/(\d+):")  # the converter reports every layer: every 10th is enough here
_LOADED = re.compile(r"loaded from|hosts experts|^router: ")  # log messages of a service that has its model


def first_start_note(model: str) -> str | None:
    """The line that sets expectations when the built-in model still has to be built (None otherwise)."""
    if model not in BUILTIN or (home.models_dir() / model / "config.json").is_file():
        return None
    low, high = FIRST_START_MINUTES
    return (f"first start: building the built-in model {model!r} into {home.models_dir()} once; this takes "
            f"{low}-{high} minutes on 2 CPU cores, the busier the longer (later starts: under half a minute)")


def interesting(line: str) -> str | None:
    """The part of a log line worth showing on the console, or None."""
    line = line.rstrip()
    if _CONVERSION.match(line):
        layer = _LAYER.search(line)
        if layer and int(layer[1]) % 10 and layer[1] != layer[2]:
            return None
        return line
    _, sep, message = line.partition("] ")  # FORMAT of moemesh/serving/logging.py: "... [trace_id=.. span_id=..] msg"
    return message if sep and _LOADED.search(message) else None


class StartProgress:
    """Context manager around up's wait for SERVING (see the module docstring)."""

    def __init__(self, logs: dict[str, Path], run_dir: Path, say: Callable[[str], None], *,
                 quiet_s: float = 20.0, poll_s: float = 0.5) -> None:
        self._logs, self._run_dir, self._say = logs, run_dir, say
        self._quiet_s, self._poll_s = quiet_s, poll_s
        self._offsets = {name: _size(path) for name, path in logs.items()}  # logs are appended to across runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="start-progress", daemon=True)
        self._start = self._last_said = time.monotonic()

    def __enter__(self) -> StartProgress:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if exc_type is None:
            self._say(f"  all {len(self._logs)} services SERVING after {time.monotonic() - self._start:.0f} s")

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            for name in self._logs:
                for message in self._new_lines(name):
                    self._tell(f"  ..  {name:<10} {message}")
            if time.monotonic() - self._last_said > self._quiet_s:
                waiting = [n for n in self._logs if not (self._run_dir / f"{n}.json").exists()]
                self._tell(f"  ..  {time.monotonic() - self._start:.0f} s: still starting {', '.join(waiting)} "
                           f"(logs in {home.subdir('logs')})")

    def _tell(self, line: str) -> None:
        self._say(line)
        self._last_said = time.monotonic()

    def _new_lines(self, name: str) -> list[str]:
        """Interesting complete lines appended to the log since the last call."""
        try:
            with self._logs[name].open("rb") as f:
                f.seek(self._offsets[name])
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offsets[name] += end
        lines = data[:end].decode("utf-8", "replace").splitlines()
        return [m for m in map(interesting, lines) if m]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
