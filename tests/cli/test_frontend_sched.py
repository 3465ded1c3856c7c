"""The front end's scheduling policy (MOEMESH_FRONTEND_SCHED, moemesh/cli/data_plane.py): SCHED_BATCH for gateway,
tokenizer and metering only, applied to the real child process before it execs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from moemesh.cli.data_plane import sched_batch_of
from moemesh.serving.supervisor import Child


def test_only_the_front_end_runs_batch_and_a_bad_value_is_named() -> None:
    env = {"MOEMESH_FRONTEND_SCHED": "batch"}
    assert [sched_batch_of(n, env) for n in ("gateway", "tokenizer", "metering")] == [True] * 3
    assert [sched_batch_of(n, env) for n in ("router", "batcher", "expert-0")] == [False] * 3
    assert not sched_batch_of("gateway", {})
    with pytest.raises(ValueError, match="MOEMESH_FRONTEND_SCHED: 'idle'"):
        sched_batch_of("gateway", {"MOEMESH_FRONTEND_SCHED": "idle"})


def test_a_child_started_with_sched_batch_runs_under_it(tmp_path: Path) -> None:
    children = [Child(name, [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ),
                      tmp_path / f"{name}.log", sched_batch=batch) for name, batch in (("b", True), ("n", False))]
    try:
        for child in children:
            child.start()  # returns once the child has exec'd: its preexec (the policy) has run
        assert [os.sched_getscheduler(c.pid) for c in children] == [os.SCHED_BATCH, os.SCHED_OTHER]
    finally:
        for child in children:
            child.kill_group()
            child.wait(5)
