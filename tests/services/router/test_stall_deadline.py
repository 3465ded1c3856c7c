"""When a silent shard counts as stalled (services/router/stall_deadline.py), on a fake clock: silence past the deadline
at an on-time check fails it within one poll; a router that was itself away (a late check, or the first check of a
wait) gives the shard one more poll before blaming it; a router late at every check still fails it about one
deadline after it first saw it silent; silence does not count while the block is not yet overdue for its size
(BlockPace: a decode block at once, a long prefill block after 2x what such blocks took); the default deadline
leaves room for a stopped shard's error to reach a client within 1 s; the kernel tells a starved process (a thread
running or runnable) from a stopped or sleeping one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from services.router import stall_deadline
from services.router.stall_deadline import BlockPace, StallJudge


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _checks(judge: StallJudge, clock: Clock, last_beat: float, every: float, until: float) -> float | None:
    """Checks every `every` seconds until `until`; the clock time of the first stalled verdict, or None."""
    while clock.now < until:
        clock.now += every
        if judge.stalled(last_beat) is not None:
            return clock.now
    return None


def test_a_silent_shard_fails_within_a_poll_of_the_deadline_and_a_beating_one_never():
    clock = Clock()
    judge = StallJudge(0.6, clock)
    judge.reset()
    beat = clock.now
    failed = _checks(judge, clock, beat, judge.poll_s, beat + 5)
    assert failed is not None and 0.6 < failed - beat <= 0.6 + judge.poll_s + 1e-9
    judge.reset()
    for _ in range(200):  # beats every deadline/6, checks every poll: never stalled
        clock.now += judge.poll_s
        assert judge.stalled(clock.now - stall_deadline.beat_s(0.6)) is None


def test_after_a_late_check_the_shard_gets_one_more_poll():
    clock = Clock()
    judge = StallJudge(0.6, clock)
    judge.reset()
    clock.now += judge.poll_s
    assert judge.stalled(clock.now) is None
    clock.now += 0.9  # the router was not scheduled for 0.9 s: the shard probably was not either
    beat = clock.now - 0.9
    assert judge.stalled(beat) is None  # late: not blamed yet
    clock.now += judge.poll_s / 10  # a busy poller (NCCL) checks again at once: still the grace
    assert judge.stalled(beat) is None
    clock.now += judge.poll_s  # on time, past the grace, no beat meanwhile: stalled
    assert judge.stalled(beat) == pytest.approx(clock.now - beat)


def test_the_first_check_of_a_wait_does_not_blame_an_old_beat_but_the_next_does():
    clock = Clock()
    judge = StallJudge(0.6, clock)
    beat = clock.now - 3.0  # stopped long before this wait began
    judge.reset()
    clock.now += judge.poll_s
    assert judge.stalled(beat) is None
    clock.now += judge.poll_s
    assert judge.stalled(beat) is not None


def test_a_router_late_at_every_check_still_fails_a_silent_shard_one_deadline_later():
    clock = Clock()
    judge = StallJudge(0.6, clock)
    judge.reset()
    beat, every = clock.now, 3 * judge.poll_s  # every check late
    failed = _checks(judge, clock, beat, every, beat + 5)
    assert failed is not None and 1.2 < failed - beat <= 1.2 + 2 * every + 1e-9


def test_the_default_deadline_fits_the_one_second_budget_and_bad_deadlines_are_refused():
    assert stall_deadline.DEFAULT_S + stall_deadline.poll_s(stall_deadline.DEFAULT_S) <= 0.7  # + ~0.1 s to the client
    assert stall_deadline.beat_s(stall_deadline.DEFAULT_S) == pytest.approx(0.1)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="stall deadline"):
            StallJudge(bad)


def test_silence_counts_only_once_the_block_is_overdue_for_its_size():
    pace = BlockPace()
    assert pace.overdue_after(1) < 0.01  # decode: overdue within milliseconds, the deadline alone decides
    pace.observe(3.0, 2048)  # a 2048-token block took 3 s on this link
    assert pace.overdue_after(2048) == pytest.approx(6.0)
    pace.observe(30.0, 8)  # small blocks are fixed cost: not paced
    assert pace.overdue_after(2048) == pytest.approx(6.0)
    for _ in range(300):  # faster blocks since: the slow one fades
        pace.observe(0.2, 2048)
    assert pace.overdue_after(2048) == pytest.approx(0.4)
    clock = Clock()
    judge, start = StallJudge(0.6, clock), clock.now
    judge.reset()
    beat = clock.now  # the shard went silent as the block started
    failed = None
    while failed is None and clock.now - start < 10:
        clock.now += judge.poll_s
        failed = judge.stalled(beat, clock.now - start > 3.0)  # overdue after 3 s
    assert failed is not None and 3.0 < clock.now - start <= 3.0 + judge.poll_s + 1e-9


@pytest.mark.parametrize("busy", [True, False])
def test_runnable_tells_a_busy_or_starved_process_from_a_stopped_or_sleeping_one(busy):
    code = "while True: pass" if busy else "import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while stall_deadline.runnable(child.pid) is not busy:  # a fresh process is runnable while it starts
            assert time.monotonic() < deadline, f"runnable({child.pid}) never became {busy}"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.1)
        assert stall_deadline.runnable(child.pid) is False  # every thread 'T'
        os.kill(child.pid, signal.SIGCONT)
    finally:
        child.kill()
        child.wait(10)
    assert stall_deadline.runnable(child.pid) is None and stall_deadline.runnable(0) is None
