"""The router's side of launching steps ahead (moemesh/runtime/step_ahead.py), fed by the batcher's pipelined steps:

    event loop:     Step N+1 arrives (follows N, no releases) -> offer(N+1, works)
    engine thread:  job N:   launch N (unless launched by job N-1) -> wait until offer N+1 or N done on the GPU
                             -> launch N+1 after N -> finish N -> results N
                    job N+1: finish N+1 (launched already) -> ...

So while the GPU runs step N, the engine thread prepares step N+1 and queues it behind N: the GPU goes from one step
to the next without waiting for the host, the router's gRPC and bookkeeping work included. A job whose step does not
qualify runs Engine.step as before (which first finishes whatever is in flight).
"""

from __future__ import annotations

import time

from moemesh.runtime.engine import Engine
from moemesh.runtime.types import SequenceResult, SequenceWork

POLL = 0.0002  # seconds between looks for the next step's request while the current step runs on the device


class StepsAhead:
    def __init__(self, engine: Engine, enabled: bool = True) -> None:
        self.engine, self.enabled = engine, enabled
        self._offers: dict[int, list[SequenceWork]] = {}  # step id -> works (written by the event loop thread)
        self._launched: dict[int, object] = {}  # step id -> step_ahead.Launched (engine thread only)

    def offer(self, step_id: int, works: list[SequenceWork]) -> None:
        """Event loop: a step that may be launched while the one before it runs (it releases nothing)."""
        if self.enabled:
            self._offers[step_id] = works

    def step(self, step_id: int, works: list[SequenceWork]) -> list[SequenceResult]:
        """Engine thread: the results of step `step_id`, launching the next offered step before waiting for them."""
        self._offers.pop(step_id, None)
        for stale in [i for i in self._launched if i < step_id]:  # its request never came (a batcher went away)
            self._launched.pop(stale)
        mine = self._launched.pop(step_id, None)
        if mine is not None and mine.key != [(w.seq_id, w.position) for w in works]:
            mine = None  # not what was launched under this id (a restarted batcher reuses ids): settled by step()
        if mine is None:
            mine = self.engine.launch(works) if self.enabled else None
            if mine is None:
                return self.engine.step(works)
        following = self._launch_next(step_id + 1, mine)
        try:
            return self.engine.finish(mine)
        except BaseException:
            if following is not None:
                self._launched.pop(step_id + 1, None)
                self.engine.abort(following)
            raise

    def _launch_next(self, step_id: int, current):
        """Launches the offered step `step_id` behind `current` if its request arrives before `current` is done on
        the device. Anything it cannot launch is left to its own job (which reports the error, if any)."""
        while step_id not in self._offers and not current.done():
            time.sleep(POLL)  # the GIL is free meanwhile: the event loop decodes the request
        works = self._offers.pop(step_id, None)
        if works is None:
            return None
        try:
            launched = self.engine.launch(works, after=current)
        except Exception:  # noqa: BLE001 -- nothing changed (launch rolls back); its own job runs and reports it
            return None
        if launched is not None:
            self._launched[step_id] = launched
        return launched
