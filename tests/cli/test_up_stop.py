"""`moemesh up`'s stop order: the edge (Envoy exits at once on SIGTERM, cutting its client connections) is told only
once the draining gateway has exited, however long its drain takes within GATEWAY_WAVE_S; the whole stop stays
within STOP_BUDGET_S. Plain Python children standing in for the services, no mesh."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from moemesh.cli import up
from moemesh.serving.supervisor import Child

# On SIGTERM: wait `delay` seconds (a drain), note the time in the shared file, exit 0.
CHILD = ("import signal, sys, time\n"
         "def term(*_):\n"
         "    time.sleep({delay})\n"
         "    open({log!r}, 'a').write('{name} %f\\n' % time.time())\n"
         "    sys.exit(0)\n"
         "signal.signal(signal.SIGTERM, term)\n"
         "print('UP' + 'NOW', flush=True)\n"
         "time.sleep(60)\n")


def _child(tmp_path: Path, name: str, delay: float) -> Child:
    code = CHILD.format(delay=delay, log=str(tmp_path / "order.log"), name=name)
    return Child(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log")


def test_the_edge_stops_only_after_the_gateway_drained(tmp_path: Path) -> None:
    # A gateway draining for 6 s: longer than the share of the budget its wave used to get (5.4 s), as a starved
    # gateway's drain can be; its in-band error events must still reach clients through the edge.
    children = {"gateway": _child(tmp_path, "gateway", 6.0), "edge": _child(tmp_path, "edge", 0.0),
                "batcher": _child(tmp_path, "batcher", 0.0)}
    for child in children.values():
        child.start()
    deadline = time.monotonic() + 20
    while not all("UPNOW" in c.log_tail() for c in children.values()):
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.05)
    start = time.monotonic()
    up.stop(children, tmp_path / "status.json", tmp_path / "run", lambda _: None)
    took = time.monotonic() - start
    order = [line.split()[0] for line in (tmp_path / "order.log").read_text().splitlines()]
    assert order == ["gateway", "edge", "batcher"], order
    assert all(c.exited() == 0 for c in children.values()) and took < up.STOP_BUDGET_S
