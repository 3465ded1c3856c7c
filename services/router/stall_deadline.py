"""When a silent expert shard counts as stalled: one rule for the shared-memory links, the process-group watch
(services/router/shard_watch.py) and the beat cadence of the process-group data plane (services/router/dist_link.py).

The deadline (`--stall-timeout`, DEFAULT_S) is chosen so that a stopped shard's step reaches its clients well
within 1 s (deadline + one poll + the batcher/gateway hop, ~0.1 s quiet), while a live shard, even one busy in a
long prefill on a loaded 2-core host, never misses it: shards beat from a thread of their own (not the compute
thread; torch ops release the GIL) BEATS_PER_DEADLINE times per deadline (shared memory: every
shm_region.HEARTBEAT_S, 12 per default deadline), so a live one must miss that many beats in a row. Where the
router polls (shared memory: its receive wakes every `poll_s`; NCCL: between work polls) it asks
`StallJudge.stalled(last_beat)`, which also refuses to blame a shard for the router's own absence: a router that
was not scheduled for a while (a loaded host, a GC pause) wakes to find every beat old although its peers were
starved the same way, so after a late check it gives them one more poll to show up before it calls them stalled
(false positives are worse than slowness). A router late at every check still fails a shard that stayed silent
for one more deadline after the router first saw it silent.

Silence alone is not enough while a block is not yet overdue (BlockPace, shared-memory and gloo links): a shard
computing a long prefill block on a loaded host, the one place where its beat thread was seen to fall behind (gaps
of 0.15-0.4 s at load 12-14, tests/services/router/test_busy_shard_liveness.py: the GIL, and the CPU its own torch
threads and others take), is judged only once the block has taken OVERDUE_FACTOR x what blocks of its size took on
that link. A decode block is overdue within milliseconds, so a stopped shard mid-decode still fails at the deadline;
a stopped shard mid-prefill fails later, at the latest at --expert-timeout. (NCCL's watch is judged per shard, not
per block: its beats come from the shard's event loop, which a long block does not hold.)

On the same host (shared memory) the router can also ask the kernel (`runnable`): a shard process with a thread
running or waiting for a CPU is starved, not stalled, and is left to --expert-timeout; a stopped one (SIGSTOP: every
thread 'T') or one whose threads all sleep without beating is stalled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

DEFAULT_S = 0.6  # the router's --stall-timeout default
BEATS_PER_DEADLINE = 6  # liveness beats a shard sends per deadline (a live one must miss 6 in a row)
POLLS_PER_DEADLINE = 10  # the router looks at a shard's beats this often per deadline while it waits
MIN_POLL_S = 0.005
GRACE_POLLS = 0.9  # after a late check, the shard gets this many polls to beat (< 1: the next on-time poll judges)
OVERDUE_FACTOR = 2.0  # a block is overdue once it took this many times the expected time for its tokens
PRIOR_S_PER_TOKEN = 1e-3  # the expected pace before a link has seen a block (a 2k-token block: overdue after 4 s)
PACE_DECAY = 0.99  # per block: the slowest pace seen fades (a one-off slow block does not stretch all later ones)
PACE_MIN_TOKENS = 64  # smaller blocks are mostly fixed cost (and overdue within ms anyway): not paced


def poll_s(deadline_s: float) -> float:
    """How often a waiting router looks at the beats (a receive timeout, not a busy wait)."""
    return max(deadline_s / POLLS_PER_DEADLINE, MIN_POLL_S)


def beat_s(deadline_s: float) -> float:
    """How often a shard beats for a router with this deadline."""
    return deadline_s / BEATS_PER_DEADLINE


class StallJudge:
    """Per shard (or link): `stalled(last_beat)` is the silence in seconds once it counts as stalled, else None."""

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not deadline_s > 0:
            raise ValueError(f"stall deadline must be > 0 seconds, got {deadline_s!r}")
        self.deadline_s, self.poll_s, self._clock = deadline_s, poll_s(deadline_s), clock
        self._checked: float | None = None  # when the last check ran (None: none since reset)
        self._trusted_from = 0.0  # checks before this time follow a late one: the peer gets one more poll
        self._silent_since: float | None = None  # the first check that found the shard past its deadline

    def reset(self) -> None:
        """At the start of a wait: its first check counts as late (the last one was a step or more ago)."""
        self._checked = self._silent_since = None

    def stalled(self, last_beat: float, overdue: bool = True) -> float | None:
        """last_beat: the clock's time of the shard's latest beat; overdue: whether the block waited for is (while
        it is not, no silence counts, but the check still times the router's own lateness)."""
        now = self._clock()
        if self._checked is None or now - self._checked > 2 * self.poll_s:  # we were away (or just started)
            self._trusted_from = now + GRACE_POLLS * self.poll_s
        self._checked = now
        silence = now - last_beat
        if silence <= self.deadline_s or not overdue:
            self._silent_since = None
            return None
        if self._silent_since is None:
            self._silent_since = now
        if now < self._trusted_from and now - self._silent_since <= self.deadline_s:
            return None  # a late check: one more poll for the shard (unless it stayed silent another deadline)
        return silence


class BlockPace:
    """A link's seconds per token of its recent blocks (the slowest, fading), to tell when a block is overdue."""

    def __init__(self) -> None:
        self.per_token = PRIOR_S_PER_TOKEN

    def observe(self, seconds: float, tokens: int) -> None:
        """A block of `tokens` answered `seconds` into the router's wait for it."""
        if tokens >= PACE_MIN_TOKENS:
            self.per_token = max(self.per_token * PACE_DECAY, seconds / tokens)

    def overdue_after(self, tokens: int) -> float:
        """Seconds into the router's wait for a block of `tokens` at which it is overdue."""
        return OVERDUE_FACTOR * self.per_token * max(tokens, 1)


def runnable(pid: int) -> bool | None:
    """Whether a thread of process `pid` is running, waiting for a CPU or in an uninterruptible wait (it will go on);
    None when that cannot be told (pid unknown, another pid namespace, not Linux). ~0.1 ms for ~20 threads."""
    if pid <= 0:
        return None
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        if state in (b"R", b"D"):
            return True
    return False
